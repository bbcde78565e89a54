"""precision=nf4 on MoE models (tiny_mgm_moe: Mixtral experts; tiny_glm45v: GLM-4.5V experts + shared expert): the
fused 3-D expert tensors are quantised per expert with bitsandbytes' nf4 and dequantised one expert at a time in the
MoE forward; LoRA trains on attention about as well as over a bf16 base, the adapter reloads onto a plain base, LoRA
on the 4-bit experts is a clear error, and the planner's expert bytes equal what the quantised model holds."""
from __future__ import annotations

import csv

import pytest
import torch

from conftest import compose_cfg
from vlm_finetune.config import model_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.models import moe_nf4
from vlm_finetune.models.registry import get_family
from vlm_finetune.train import train

bnb = pytest.importorskip("bitsandbytes", reason="precision=nf4 needs bitsandbytes (pip install -e '.[test]')")

MODELS = {"tiny_mgm_moe": "mgm", "tiny_glm45v": "glm4v"}
RUN = ["trainer.max_steps=30", "eval.generate=false", "trainer.val_every_n_steps=null",
       "trainer.enable_progress_bar=false", "lora.llm_modules=attention"]


def _quantised(model_name: str, tmp_path):
    cfg = compose_cfg([f"model={model_name}"], tmp_path)
    family = get_family(MODELS[model_name])
    plain = family.build_model(model_settings(cfg.model), dtype=torch.bfloat16)
    four_bit = family.build_model(model_settings(cfg.model), dtype=torch.bfloat16, quantization="nf4")
    return plain, four_bit


@pytest.mark.parametrize("model_name", list(MODELS))
def test_expert_weights_are_stored_in_4_bit_and_dequantise_per_expert(model_name, tmp_path):
    import bitsandbytes.functional as bnbf

    plain, four_bit = _quantised(model_name, tmp_path)
    references = dict(plain.named_modules())
    quantised = [(n, m) for n, m in four_bit.named_modules() if hasattr(m, "_nf4_shapes")]
    assert len(quantised) == len(moe_nf4.expert_modules(plain)) > 0
    for name, module in quantised:
        reference = references[name]
        assert type(module).__name__ == "Nf4" + type(reference).__name__ and isinstance(module, type(reference))
        assert not any(p.dim() == 3 and p.is_floating_point() for p in module.parameters())  # no 16-bit copy
        for tensor in moe_nf4.EXPERT_TENSORS:
            weight = getattr(reference, tensor).detach()
            experts, rows, cols = weight.shape
            packed = getattr(module, f"{tensor}_nf4")
            assert packed.dtype == torch.uint8 and tuple(packed.shape) == (experts, rows * cols // 2)  # 2 codes/byte
            assert tuple(getattr(module, f"{tensor}_absmax").shape) == (experts, rows * cols // 64)
            for expert in range(experts):  # each expert alone: bitsandbytes' own round trip of that matrix
                codes, state = bnbf.quantize_4bit(weight[expert].contiguous(), blocksize=64,
                                                  compress_statistics=False, quant_type="nf4")
                assert torch.equal(getattr(module, tensor)[expert], bnbf.dequantize_4bit(codes, state))
        hidden = torch.randn(6, reference.gate_up_proj.shape[-1], dtype=torch.bfloat16)
        index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
        weights = torch.full((6, 2), 0.5, dtype=torch.bfloat16)
        with torch.no_grad():
            want, got = reference(hidden, index, weights), module(hidden, index, weights)
        assert float((want - got).norm() / want.norm()) < 0.3  # 4-bit rounding of random std-0.1 weights
    # the planner's expert bytes (meta build, no weight read) are exactly the bytes the quantised model holds
    from vlm_finetune.plan import plan_memory

    plan = plan_memory([f"model={model_name}", "precision=nf4", "lora.llm_modules=attention"])
    row = next(r for r in plan.rows if r.item.startswith("llm frozen experts nf4"))
    assert row.bytes == moe_nf4.quantized_bytes(four_bit) > 0
    assert row.bytes == sum(t.nbytes for _, m in quantised for k, t in [*m.named_parameters(), *m.named_buffers()]
                            if k.endswith(("_nf4", "_absmax", "_code")))


@pytest.mark.slow  # a training comparison; the quick suite keeps the family contract's nf4 storage check
@pytest.mark.parametrize("model_name", list(MODELS))
def test_nf4_moe_trains_like_bf16_and_the_adapter_reloads(model_name, tmp_path):
    from peft import PeftModel

    run = RUN + [f"model={model_name}"]
    metrics, objects = train(compose_cfg(run + ["precision=nf4"], tmp_path / "nf4"))
    model = objects["module"].model
    assert any(type(m).__name__.startswith("Nf4") for m in model.modules())  # the experts trained 4-bit
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    reference, _ = train(compose_cfg(run + ["precision=bf16-mixed"], tmp_path / "bf16"))
    assert metrics["total_parameters"] == reference["total_parameters"]  # packed codes count as the weights
    with open(tmp_path / "nf4" / "csv" / "metrics.csv") as handle:
        first = [float(r["train_loss"]) for r in csv.DictReader(handle) if r.get("train_loss")][0]
    assert metrics["train_loss"] < 0.6 * first  # it learned (LoRA on attention only: ~5.0 -> ~2.6 in 30 steps)
    print(f"{model_name}: val_loss nf4 {metrics['val_loss']:.4f}, bf16 {reference['val_loss']:.4f}")
    assert abs(metrics["val_loss"] - reference["val_loss"]) < 0.25 * reference["val_loss"], (metrics, reference)
    cfg = compose_cfg([f"model={model_name}"], tmp_path)
    reloaded = PeftModel.from_pretrained(get_family(MODELS[model_name]).build_model(model_settings(cfg.model)), tmp_path / "nf4" / "adapter")
    names = [n for n, _ in reloaded.named_parameters() if "lora_A" in n]
    assert names and all(".self_attn." in n for n in names)


def _experts(quantise: bool, weights: dict) -> torch.nn.Module:
    """Mixtral experts (hidden 16, width 12, 4 experts) in float32 under a holder module; `quantise`: the tensors
    become nf4 codes (float32 compute: dequantised to float32)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    holder = torch.nn.Module()
    holder.experts = MixtralExperts(MixtralConfig(hidden_size=16, intermediate_size=12, num_local_experts=4))
    for name, value in weights.items():
        getattr(holder.experts, name).data.copy_(value)
    if quantise:
        assert moe_nf4.quantize_experts_nf4(holder) == 1
    return holder


def _with_lora(holder: torch.nn.Module, factors: dict | None):
    """PEFT's LoRA (rank 2) on both fused tensors; `factors`: values for its A and B (B starts at zero)."""
    from peft import LoraConfig, get_peft_model

    from vlm_finetune.models.moe_lora import nf4_targets_for_peft

    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.gate_up_proj",
                                                                                 "experts.down_proj"])
    with nf4_targets_for_peft(holder):
        model = get_peft_model(holder, config)
    for name, param in model.named_parameters():
        if factors is not None and name in factors:
            param.data.copy_(factors[name])
    return model


def test_lora_on_4_bit_experts_equals_peft_on_the_dequantised_experts_and_keeps_no_expert_for_backward(tmp_path):
    """LoRA per expert on nf4 experts (one process, float32 compute): the output and every gradient equal PEFT's
    own forward over a 16-bit copy of the dequantised experts; nothing of an expert's matrix is saved for
    backward; the adapter has PEFT's keys and shapes for 16-bit experts and reloads with PEFT onto them."""
    from peft import PeftModel

    from vlm_finetune.models.moe_lora import apply_per_expert_lora

    torch.manual_seed(0)
    weights = {"gate_up_proj": 0.3 * torch.randn(4, 24, 16), "down_proj": 0.3 * torch.randn(4, 16, 12)}
    four_bit = _with_lora(_experts(True, weights), None)
    factors = {n: torch.randn_like(p) for n, p in four_bit.named_parameters() if "lora_" in n}
    four_bit = _with_lora(_experts(True, weights), factors)
    assert apply_per_expert_lora(four_bit) == 1
    experts = four_bit.base_model.model.experts.base_layer.base_layer
    assert type(experts).__name__ == "Nf4MixtralExperts" and "gate_up_proj" not in experts._parameters
    dequantised = {name: torch.stack([getattr(experts, name)[e] for e in range(4)]) for name in weights}
    assert dequantised["gate_up_proj"].dtype == torch.float32
    reference = _with_lora(_experts(False, dequantised), factors)  # PEFT's own forward (W + delta per layer)
    assert sorted(four_bit.state_dict().keys() - {k for k in four_bit.state_dict() if "_nf4" in k or "_absmax" in k
                                                  or "_code" in k}) == \
        sorted(k for k in reference.state_dict() if not k.endswith(("base_layer.gate_up_proj", "base_layer.down_proj")))

    hidden = torch.randn(10, 16)
    index = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    route = torch.rand(10, 2)
    outputs, gradients = [], []
    for model in (four_bit, reference):
        x, w = hidden.clone().requires_grad_(True), route.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = model.base_model.model.experts(x, index, w)
        leaves = [x, w] + [p for n, p in sorted(model.named_parameters()) if p.requires_grad]
        gradients.append(torch.autograd.grad(out.square().sum(), leaves))
        outputs.append(out)
        if model is four_bit:  # neither a whole stack nor one expert's matrix (24 x 16, 16 x 12) is kept
            assert saved and not any(s[-2:] in ((24, 16), (16, 12)) or len(s) == 3 for s in saved), saved
    # (W + s B A) x against W x + s B (A x): float32 sums in another order, within 1e-5 of the tensor's largest
    close = lambda got, want: (got - want).abs().max() <= 1e-5 * want.abs().max()  # noqa: E731
    assert close(outputs[0], outputs[1]) and outputs[1].abs().max() > 0
    assert len(gradients[0]) == len(gradients[1]) == 2 + 4
    for got, want in zip(*gradients):
        assert close(got, want) and want.abs().max() > 0

    four_bit.save_pretrained(tmp_path / "adapter")  # PEFT's layout: reloads onto 16-bit experts
    reloaded = PeftModel.from_pretrained(_experts(False, dequantised), tmp_path / "adapter")
    with torch.no_grad():
        assert close(reloaded.base_model.model.experts(hidden, index, route), outputs[1].detach())


def test_lora_on_4_bit_experts_is_planned_and_peft_forward_refused(tmp_path):
    from vlm_finetune.plan import plan_memory

    overrides = ["model=tiny_mgm_moe", "precision=nf4", "lora.llm_modules=all"]
    plan = plan_memory(overrides)
    assert any(r.item.startswith("llm frozen experts nf4") for r in plan.rows)
    assert plan.trainable_parameters > plan_memory([*overrides[:2], "lora.llm_modules=attention"]).trainable_parameters
    with pytest.raises(ConfigError, match="lora.expert_forward=per_expert"):
        plan_memory([*overrides, "lora.expert_forward=peft"])
