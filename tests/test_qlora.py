"""precision=nf4 (QLoRA) on the CPU, through bitsandbytes' CPU backend, for GLM-4V and MGM: the LLM's linear
layers load in 4-bit, the vision tower, projector and head stay bf16, LoRA trains on the 4-bit base to about
the loss of a bf16 base, and the adapter reloads onto a plain (unquantised) base."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import compose_cfg, run_cli
from vlm_finetune.config import model_settings
from vlm_finetune.models.registry import get_family
from vlm_finetune.train import train

bnb = pytest.importorskip("bitsandbytes", reason="precision=nf4 needs bitsandbytes (pip install -e '.[test]')")

RUN = ["trainer.max_steps=30", "eval.generate=false", "trainer.val_every_n_steps=null",
       "trainer.enable_progress_bar=false"]


@pytest.mark.slow  # a training comparison; the quick suite keeps the family contract's nf4 storage check
def test_nf4_quantises_only_the_llm_and_trains_like_bf16(tmp_path):
    metrics, objects = train(compose_cfg(RUN + ["precision=nf4"], tmp_path / "nf4"))
    model = objects["module"].model
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(".language_model.layers." in n for n in four_bit), four_bit[:3]
    # every LLM projection: 2 layers x (q, k, v, o, gate_up, down)
    assert len(four_bit) == 12
    for name, param in model.named_parameters():
        if ".visual." in name or "lm_head" in name:
            assert param.dtype in (torch.bfloat16, torch.float32), name  # not packed 4-bit
    trainable, total = metrics["trainable_parameters"], metrics["total_parameters"]
    reference, _ = train(compose_cfg(RUN + ["precision=bf16-mixed"], tmp_path / "bf16"))
    assert total == reference["total_parameters"] and trainable == reference["trainable_parameters"]
    first = float(next(iter(_losses(tmp_path / "nf4"))))
    assert metrics["train_loss"] < 0.5 * first  # it learned
    # 4-bit rounding of the frozen base costs little at this size
    assert abs(metrics["val_loss"] - reference["val_loss"]) < 0.25 * reference["val_loss"], (metrics, reference)

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    cfg = compose_cfg([], tmp_path)
    base = AutoModelForImageTextToText.from_pretrained(get_family("glm4v").checkpoint_folder(model_settings(cfg.model)))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "nf4" / "adapter")
    assert sum(1 for n, _ in reloaded.named_parameters() if "lora_A" in n) == 12


def _losses(run_dir):
    import csv

    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(r["train_loss"]) for r in csv.DictReader(handle) if r.get("train_loss")]


@pytest.mark.distributed
@pytest.mark.slow
def test_nf4_under_zero2_on_two_cpu_ranks_trains_and_saves_the_adapter(tmp_path):
    """The recommended multi-GPU QLoRA layout (each rank holds the 4-bit base, ZeRO-2 shards the rest),
    rehearsed on two CPU processes."""
    import os

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parent.parent
    args = ["precision=nf4", "trainer=zero2", "hardware=cpu", "hardware.devices=2", "trainer.max_steps=6",
            "data.num_train=128", "data.num_val=8", "data.micro_batch_size=8", "trainer.enable_progress_bar=false",
            "trainer.val_every_n_steps=null", f"hydra.run.dir={tmp_path}"]
    result = run_cli(args, timeout=600, cwd=root, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert len(lora_b) == 12 and max(float(v.abs().max()) for v in lora_b) > 0


@pytest.mark.slow  # a training comparison; the quick suite keeps the family contract's nf4 storage check
@pytest.mark.parametrize("model", ["tiny_mgm", "tiny_mgm_moe"])
def test_mgm_nf4_quantises_the_decoder_linears_and_trains_like_bf16(model, tmp_path):
    from peft import PeftModel
    from torch import nn

    family = get_family("mgm")
    cfg = compose_cfg([f"model={model}"], tmp_path)
    plain = family.build_model(model_settings(cfg.model))
    expected = sum(1 for m in plain.model.layers.modules() if type(m) is nn.Linear)
    # LoRA on attention only for the MoE: this test counts the 4-bit linear layers (its 4-bit experts, with or without
    # LoRA, are tests/test_moe_nf4.py's); with LoRA on attention alone it needs 45 steps to halve its loss, not 30
    run = RUN + [f"model={model}"] + (["lora.llm_modules=attention", "trainer.max_steps=45"]
                                      if model == "tiny_mgm_moe" else [])
    metrics, objects = train(compose_cfg(run + ["precision=nf4"], tmp_path / "nf4"))
    four_bit = [n for n, m in objects["module"].model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == expected > 0 and all(".layers." in n for n in four_bit)
    if model == "tiny_mgm_moe":  # the fused 3-D experts are no Linear4bit (moe_nf4 quantises them per expert)
        assert not any(".experts" in n for n in four_bit)
    reference, _ = train(compose_cfg(run + ["precision=bf16-mixed"], tmp_path / "bf16"))
    assert metrics["total_parameters"] == reference["total_parameters"]
    assert metrics["train_loss"] < 0.5 * _losses(tmp_path / "nf4")[0]
    assert abs(metrics["val_loss"] - reference["val_loss"]) < 0.25 * reference["val_loss"], (metrics, reference)
    reloaded = PeftModel.from_pretrained(family.build_model(model_settings(cfg.model)), tmp_path / "nf4" / "adapter")
    assert any("lora_A" in n for n, _ in reloaded.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_4bit_layer_keeps_its_training_kernel_and_gradients_after_a_validation_forward(dtype):
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel at the first eval forward without gradients
    (CPUs with AVX512-BF16) and keeps it repacked, after which a training forward computes in that kernel (here 9e-3
    off) and passes no gradient to its input. quantize_linear_nf4 keeps the training kernel: after a validation
    forward the output and the input's gradient are bit-identical to those before it."""
    from vlm_finetune.models.nf4_load import quantize_linear_nf4

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False)).to(dtype)
    assert quantize_linear_nf4(model) == 1 and type(model[0]).__name__ == "Linear4bit"
    assert model[0].compute_dtype == dtype  # computes in the dtype the model was loaded in (nf4-fp32: float32)
    x = torch.randn(4, 256, dtype=dtype, requires_grad=True)

    def output_and_gradient():
        y = model(x)
        return y.detach(), torch.autograd.grad(y.float().sum(), x)[0]

    before = output_and_gradient()
    model.eval()
    with torch.no_grad():
        model(x.detach())
    model.train()
    after = output_and_gradient()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert float(before[1].abs().max()) > 0
