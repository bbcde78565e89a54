"""LoRA on fused MoE experts applied expert by expert (lora.expert_forward=per_expert, vlm_finetune/models/moe_lora.py)
computes what PEFT's parametrization computes, outputs and gradients, for Mixtral (tiny_mgm_moe) and GLM-4.5V
(tiny_glm45v), and leaves PEFT's adapter (keys, merging) as it is."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from vlm_finetune.config import lora_settings, model_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.models.moe_lora import _wrapper_chain
from vlm_finetune.models.registry import get_family, parse_trainability
from vlm_finetune.precision import weights_policy
from vlm_finetune.trainability import build_trainable_model

MODELS = {"tiny_mgm_moe": "mgm", "tiny_glm45v": "glm4v"}


def _build(model: str, tmp_path, forward: str):
    cfg = compose_cfg([f"model={model}", "lora.llm_modules=experts", f"lora.expert_forward={forward}"], tmp_path)
    torch.manual_seed(0)
    built, _ = build_trainable_model(get_family(MODELS[model]), model_settings(cfg.model), parse_trainability(cfg.train), lora_settings(cfg.lora),
                                     weights_policy("32-true"), checkpointed_layers=False, checkpoint_scope="layer")
    wrappers = [m for m in built.modules() if "_per_expert_forward" in str(getattr(m, "forward", ""))]
    outermost = [m for m in built.modules() if type(m).__name__ == "ParamWrapper" and len(_wrapper_chain(m)) == 2]
    with torch.no_grad():  # LoRA B starts at zero: give it values, so that the update is not trivially zero
        for name, p in built.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return built, wrappers, outermost


@pytest.mark.parametrize("model", sorted(MODELS))
def test_per_expert_lora_equals_peft_outputs_and_gradients(model, tmp_path):
    lean, patched, outer = _build(model, tmp_path, "per_expert")
    assert patched and len(patched) == len(outer)  # every MoE layer's outermost wrapper (gate_up_proj, down_proj)
    _, unpatched, _ = _build(model, tmp_path, "peft")
    assert unpatched == []
    wrapper = outer[0]
    experts = _wrapper_chain(wrapper)[-1].base_layer
    tokens, hidden, k = 24, experts.hidden_dim, 2
    torch.manual_seed(1)
    x = torch.randn(tokens, hidden)
    index = torch.stack([torch.randperm(experts.num_experts)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)
    results = {}
    for name, run in (("per_expert", wrapper.forward), ("peft", lambda *a: type(wrapper).forward(wrapper, *a))):
        wrapper.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = run(xi, index, weights)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.requires_grad}
        results[name] = (out.detach(), xi.grad, grads)
    (out, gx, grads), (ref, ref_gx, ref_grads) = results["per_expert"], results["peft"]
    assert float(ref.abs().max()) > 0 and grads.keys() == ref_grads.keys() and len(grads) == 4  # A, B per tensor
    # float32 sums in another order: within 1e-5 of each tensor's largest value
    def close(a, b):
        return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())

    assert close(out, ref) and close(gx, ref_gx)
    for name, g in grads.items():
        assert float(g.abs().max()) > 0 and close(g, ref_grads[name]), name
    # the base tensors were never parametrized (no W + delta made) and stay frozen
    assert not hasattr(experts, "parametrizations") or not experts.parametrizations
    assert not experts.gate_up_proj.requires_grad


def test_a_merged_adapter_runs_peft_forward(tmp_path):
    lean, _, outer = _build("tiny_mgm_moe", tmp_path, "per_expert")
    wrapper = outer[0]
    experts = _wrapper_chain(wrapper)[-1].base_layer
    x = torch.randn(5, experts.hidden_dim)
    index = torch.zeros(5, 2, dtype=torch.long)
    index[:, 1] = 1
    weights = torch.full((5, 2), 0.5)
    before = wrapper(x, index, weights).detach()
    for w in _wrapper_chain(wrapper):
        w.merge()
    torch.testing.assert_close(wrapper(x, index, weights).detach(), before, rtol=1e-5, atol=1e-6)


def test_an_unknown_expert_forward_is_refused_before_weights_load():
    from vlm_finetune.train import check_config

    with pytest.raises(ConfigError, match="lora.expert_forward='fast' is not one of per_expert"):
        check_config(compose_cfg(["lora.expert_forward=fast"]))


MEMORY_PROBE = """
import sys, torch
from pathlib import Path
from peft import LoraConfig, inject_adapter_in_model
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from vlm_finetune.models.moe_lora import apply_per_expert_lora
def peak():
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
config = MixtralConfig(hidden_size=1024, intermediate_size=2048, num_local_experts=8)
block = torch.nn.Module()
block.experts = MixtralExperts(config)  # gate_up_proj 64 MiB, down_proj 64 MiB in float32
torch.nn.init.normal_(block.experts.gate_up_proj, std=0.02); torch.nn.init.normal_(block.experts.down_proj, std=0.02)
block = inject_adapter_in_model(LoraConfig(r=8, target_parameters=["experts.gate_up_proj", "experts.down_proj"]), block)
if sys.argv[1] == "per_expert":
    assert apply_per_expert_lora(block) == 1
x = torch.randn(64, 1024, requires_grad=True)
index = torch.stack([torch.randperm(8)[:2] for _ in range(64)])
before = peak()
block.experts(x, index, torch.full((64, 2), 0.5)).square().sum().backward()
print((peak() - before) // 2**20)
"""


@pytest.mark.slow  # fresh processes, 20 s
def test_per_expert_lora_makes_no_whole_expert_stack():
    """One MoE layer's forward and backward (8 experts, 128 MiB of float32 expert weights, 64 tokens) in a fresh
    process: PEFT's parametrization makes W + delta and its gradient for the whole stack (hundreds of MiB more
    resident at the peak); the per-expert forward makes only token-sized tensors and the rank-8 factors."""
    import subprocess
    import sys

    growth = {mode: int(subprocess.run([sys.executable, "-c", MEMORY_PROBE, mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("peft", "per_expert")}
    # MiB (measured 568 and 34): W + delta of the 128 MiB stack and its gradient, against first-use buffers
    assert growth["peft"] >= 256, growth
    assert growth["per_expert"] <= 100 and 4 * growth["per_expert"] < growth["peft"], growth


@pytest.mark.parametrize("forward", ["per_expert", "peft"])
def test_under_zero3_the_per_expert_lora_keeps_no_expert_stack_for_backward(forward, zero_init, tmp_path):
    """tiny_mgm_moe built inside zero.Init and run by a DeepSpeed ZeRO-3 engine (one gloo rank; the MoE blocks are
    leaf modules, gathered whole for their forward and again for their backward): between the forward and the
    backward, autograd holds no tensor whose storage is as large as one layer's expert stack, except the
    parameters themselves (DeepSpeed frees their gathered data after the layer). PEFT's parametrization (the
    control) saves W + delta, a whole stack, per layer; the per-expert forward saves token blocks and factors."""
    import deepspeed

    from vlm_finetune.config import read_settings, strategy_settings
    from vlm_finetune.data.datamodule import Collator, EncodedDataset
    from vlm_finetune.data.shapes import ShapesDataset
    from vlm_finetune.module import batch_loss_sum
    from vlm_finetune.strategies import set_zero3_leaves

    cfg = compose_cfg(["model=tiny_mgm_moe", "lora.llm_modules=experts", f"lora.expert_forward={forward}",
                       "trainer=zero3", "trainer.stage3_param_persistence_threshold=0"], tmp_path)
    settings, family = read_settings(cfg), get_family("mgm")
    torch.manual_seed(0)
    with zero_init():
        model, _ = build_trainable_model(family, settings.model, parse_trainability(cfg.train), settings.lora,
                                         weights_policy("32-true", "deepspeed"), checkpointed_layers=False,
                                         checkpoint_scope="layer")
    assert set_zero3_leaves(model, family, strategy_settings(cfg.trainer))
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=0.1), config=config)
    stacks = [p.ds_numel for n, p in model.named_parameters() if n.endswith("gate_up_proj") and len(p.ds_shape) == 3]
    stack = min(stacks) * 4  # bytes of one layer's float32 gate/up experts
    assert len(stacks) == 2
    processor = family.load_processor(settings.model, "truncate")
    items = EncodedDataset(ShapesDataset("val", 2, image_size=settings.model.image_size, seed=2), processor, None)
    batch = Collator(processor)([items[i] for i in range(2)])
    held = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter) and tensor.untyped_storage().nbytes() >= stack:
            held.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_sum, count = batch_loss_sum(family, engine.module, batch, settings.loss)
    engine.backward(loss_sum / count)  # the backward runs with what was saved
    lora_grads = [p for n, p in engine.module.named_parameters() if "lora_" in n and "experts" in n]
    assert lora_grads and torch.isfinite(loss_sum)
    if forward == "peft":
        assert len(held) >= 2, held  # W + delta of each MoE layer's stacks: the check can see them
    else:
        assert held == [], held
