"""GLM-4.5V trains: `tiny_glm45v` is transformers' Glm4vMoeForConditionalGeneration cut small with the released
model's structure (a dense first layer, then MoE blocks: sigmoid top-k router, routed experts in fused 3-D
tensors and one shared expert). It learns the shapes data with the default recipe, and two CPU ranks under
ZeRO-2 and ZeRO-3 (the MoE block a ZeRO-3 leaf) train the adapter the single process trains."""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_cfg, run_cli
from vlm_finetune.config import lora_settings, model_settings
from vlm_finetune.models.registry import get_family
from vlm_finetune.train import train

ROOT = Path(__file__).resolve().parent.parent
# one global batch of 8 = the whole training set: every step sees the same samples whatever the split
EXACT = ["model=tiny_glm45v", "optimizer=sgd", "optimizer.lr=0.5", "scheduler=constant",
         "trainer.gradient_clip_val=null", "eval.generate=false", "trainer.enable_progress_bar=false",
         "trainer.log_every_n_steps=1", "trainer.max_steps=3", "lora.dropout=0.0", "data.num_train=8",
         "data.num_val=4", "trainer.val_every_n_steps=null", "precision=32-true"]


def test_tiny_glm45v_has_the_released_moe_structure(tmp_path):
    from transformers.models.glm4v_moe.modeling_glm4v_moe import (
        Glm4vMoeForConditionalGeneration,
        Glm4vMoeTextMLP,
        Glm4vMoeTextMoE,
    )

    cfg = compose_cfg(["model=tiny_glm45v"], tmp_path)
    family = get_family("glm4v")
    model = family.build_model(model_settings(cfg.model))
    assert type(model) is Glm4vMoeForConditionalGeneration
    layers = model.model.language_model.layers
    assert type(layers[0].mlp) is Glm4vMoeTextMLP  # first_k_dense_replace=1, as released
    moe = layers[1].mlp
    assert type(moe) is Glm4vMoeTextMoE and type(moe.shared_experts) is Glm4vMoeTextMLP
    assert tuple(moe.experts.gate_up_proj.shape) == (4, 2 * 128, 128)  # fused 3-D: (experts, 2 x moe_inter, hidden)
    assert tuple(moe.experts.down_proj.shape) == (4, 128, 128)
    assert family.zero3_leaf_classes == (Glm4vMoeTextMoE,)
    # random weights drawn with std 0.1 (the tiny recipe), experts included
    assert 0.08 < float(moe.experts.gate_up_proj.detach().std()) < 0.12
    # the model runs on a processed sample and the router picks 2 of 4 experts per token
    processor = family.load_processor(model_settings(cfg.model), "truncate")
    assert model.config.image_token_id == processor.image_token_id
    hidden = torch.randn(5, 128)
    _, weights, indices = moe.gate(hidden)
    assert indices.shape == (5, 2) and torch.allclose(weights.sum(-1), torch.ones(5))


@pytest.mark.parametrize("scope,attention,experts", [("all", 8, True), ("attention", 8, False),
                                                     ("experts", 0, True)])
def test_tiny_glm45v_lora_on_attention_and_the_fused_experts(scope, attention, experts, tmp_path):
    from vlm_finetune.models.registry import parse_trainability
    from vlm_finetune.precision import weights_policy
    from vlm_finetune.trainability import build_trainable_model

    cfg = compose_cfg(["model=tiny_glm45v", f"lora.llm_modules={scope}"], tmp_path)
    model, plan = build_trainable_model(get_family("glm4v"), model_settings(cfg.model), parse_trainability(cfg.train), lora_settings(cfg.lora),
                                        weights_policy("32-true"), checkpointed_layers=False, checkpoint_scope="layer")
    names = [n for n, p in model.named_parameters() if "lora_A" in n]
    assert sum(".self_attn." in n for n in names) == attention  # q, k, v, o of both layers
    # the routed experts' fused gate_up and down tensors of the MoE layer (PEFT's parameter wrappers)
    assert any(".layers.1.mlp.experts." in n for n in names) is experts
    assert plan.lora_parameters == (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else [])
    # the dense first layer and the shared expert take none (see EXPERT_PARAMETERS in the family)
    assert not any(".layers.0.mlp." in n or "shared_experts" in n for n in names)
    x = torch.randn(1, 3, 128)
    with torch.no_grad():
        assert model.get_base_model().model.language_model.layers[1].mlp(x).shape == x.shape


def test_lora_on_experts_needs_an_moe_model(tmp_path):
    from vlm_finetune.errors import ConfigError
    from vlm_finetune.models.base import Part

    cfg = compose_cfg(["lora.llm_modules=experts"], tmp_path)  # tiny_glm41v: dense
    with pytest.raises(ConfigError, match="needs an MoE model"):
        get_family("glm4v").lora_target_pattern(Part.LLM, model_settings(cfg.model), lora_settings(cfg.lora))


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(r["train_loss"]) for r in csv.DictReader(handle) if r.get("train_loss")]


def _trained(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """The reference: one process, the whole batch of 8 in one micro-batch; and the untrained adapter."""
    out = {}
    for name, steps in (("init", 0), ("single", 3)):
        run_dir = tmp_path_factory.mktemp(name)
        train(compose_cfg([*EXACT, "data.micro_batch_size=8", f"trainer.max_steps={steps}"], run_dir))
        out[name] = run_dir
    return out


@pytest.mark.distributed
@pytest.mark.slow
# ZeRO-3 (every parameter partitioned, the MoE blocks gathered whole as leaf modules) against one process is the
# family contract's (tests/test_family_contract.py)
@pytest.mark.parametrize("trainer,extra", [("zero2", [])])
def test_two_cpu_ranks_under_zero_train_the_single_process_adapter(single_runs, trainer, extra, tmp_path):
    """2 ranks x micro-batch 2 x accumulation 2 against 1 process x micro-batch 8: same logged losses, same
    trained adapter (to 1e-5 of its update)."""
    run_dir = tmp_path / trainer
    args = [*EXACT, f"trainer={trainer}", "hardware=cpu", "hardware.devices=2", "data.micro_batch_size=2",
            "trainer.accumulate_grad_batches=2", f"hydra.run.dir={run_dir}", *extra]
    result = run_cli(args, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    # under ZeRO-3 the model is built inside zero.Init from the folder, each rank holding half of the base
    built = re.search(r"ZeRO-3: built partitioned; this rank holds ([\d,]+) of the base's ([\d,]+)", result.stdout)
    if trainer == "zero3":
        held, whole = (int(g.replace(",", "")) for g in built.groups())
        assert whole / 2 <= held <= whole / 2 + 1000, (held, whole)
    else:
        assert built is None
    torch.testing.assert_close(torch.tensor(_losses(run_dir)), torch.tensor(_losses(single_runs["single"])),
                               rtol=1e-5, atol=1e-6)
    got, want, init = _trained(run_dir), _trained(single_runs["single"]), _trained(single_runs["init"])
    assert got.keys() == want.keys() == init.keys() and len(got) > 0
    moved = 0
    for key in got:
        assert got[key].shape == want[key].shape, key  # whole tensors, not ZeRO-3 slices
        delta, reference = got[key] - init[key], want[key] - init[key]
        scale = float(reference.abs().max())
        moved += scale > 0
        resolution = 4 * torch.finfo(torch.float32).eps * float(want[key].abs().max())
        assert float((delta - reference).abs().max()) <= 1e-5 * scale + resolution, key
    assert moved >= len(got) // 2


@pytest.mark.distributed
@pytest.mark.slow
def test_nf4_under_zero2_on_two_cpu_ranks(tmp_path):
    """The QLoRA layout on two CPU ranks: each holds the 4-bit base (experts 4-bit per expert), ZeRO-2 shards the rest."""
    args = ["model=tiny_glm45v", "precision=nf4", "lora.llm_modules=attention", "trainer=zero2", "hardware=cpu",
            "hardware.devices=2", "trainer.max_steps=4", "data.num_train=64", "data.num_val=8",
            "data.micro_batch_size=4", "trainer.enable_progress_bar=false", "trainer.val_every_n_steps=null",
            "eval.generate=false", f"hydra.run.dir={tmp_path}"]
    result = run_cli(args, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    lora_b = [v for k, v in _trained(tmp_path).items() if "lora_B" in k]
    assert len(lora_b) == 8 and max(float(v.abs().max()) for v in lora_b) > 0  # q, k, v, o of both layers
