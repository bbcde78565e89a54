"""LoRA on fused MoE experts, applied expert by expert (lora.expert_forward=per_expert).

transformers 5 holds the routed experts of Mixtral and GLM-4.5V as fused 3-D parameters (experts x out x in), and
PEFT puts LoRA on them as a parametrization (`target_parameters`, `ParamWrapper`): every forward computes the whole
stack W + s * lhs @ rhs of the layer (one `baddbmm`) before the expert loop reads expert e from it, and backward
makes that stack's gradient too. That is two tensors the size of the layer's experts per layer and step, on the
GPU at the layer's peak, and kept for backward: the memory the LoRA was meant to save.

Here the outermost `ParamWrapper` around an experts module runs the same expert loop as transformers' eager one,
with expert e's LoRA applied to its own tokens only through its low-rank factors:

    linear(x_e, W_e + s lhs_e rhs_e) = linear(x_e, W_e) + s * linear(linear(x_e, rhs_e), lhs_e)

so no tensor larger than one token block and the rank-r factors is made, and autograd keeps x_e and the factors,
not a whole expert stack. The factors are PEFT's own (`ParamWrapper.get_delta_factors`): the adapter, its saving,
merging and reloading are PEFT's unchanged. With adapters disabled or merged, or more than one adapter active, the
wrapper's own forward runs.

With precision=nf4 the experts are 4-bit (moe_nf4.py): expert e's matrix is dequantised alone for its tokens, and
again in backward for the input's gradient (`_Nf4ExpertLinear`), so no dequantised matrix is kept for backward and
no whole 16-bit stack ever exists. PEFT finds its targets among a module's parameters, which the 4-bit codes are
not (`gate_up_proj_nf4`): `nf4_targets_for_peft` shows it a storage-free placeholder of the logical shape while it
injects, so the adapter has the keys, shapes and config it has on 16-bit experts and reloads onto them."""
from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from vlm_finetune.models.moe_loop import expert_loop, is_nf4
from vlm_finetune.models.moe_nf4 import EXPERT_TENSORS, expert_modules


def _param_wrapper_class() -> type:
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def _wrapper_chain(wrapper: nn.Module) -> list[nn.Module]:
    """The nested ParamWrappers from `wrapper` inwards (one per targeted tensor)."""
    cls, chain = _param_wrapper_class(), []
    while isinstance(wrapper, cls):
        chain.append(wrapper)
        wrapper = wrapper.base_layer
    return chain


def _factors(chain: list[nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None:
    """parameter name -> (lhs, rhs, scaling) of the one active adapter of each wrapper; None when any wrapper is
    merged, disabled or has other than one active adapter (its own forward then applies)."""
    out = {}
    for wrapper in chain:
        adapters = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if wrapper.disable_adapters or wrapper.merged or len(adapters) != 1:
            return None
        out[wrapper.parameter_name] = wrapper.get_delta_factors(adapters[0])
    return out


def _per_expert_forward(self, hidden_states, *args, **kwargs):
    chain = _wrapper_chain(self)
    factors = _factors(chain)
    if factors is None:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return expert_loop(chain[-1].base_layer, factors, hidden_states, *args, **kwargs)


def apply_per_expert_lora(model: nn.Module) -> int:
    """Give each outermost PEFT ParamWrapper around a fused experts module the per-expert forward. Returns how many
    experts modules now run it."""
    cls = _param_wrapper_class()
    experts = {id(m) for _, m in expert_modules(model)} | {id(m) for m in model.modules() if is_nf4(m)}
    count = 0
    for parent in model.modules():
        if isinstance(parent, cls):
            continue
        for child in parent.children():
            chain = _wrapper_chain(child)
            if chain and id(chain[-1].base_layer) in experts:
                child.forward = types.MethodType(_per_expert_forward, child)
                count += 1
    return count


@contextlib.contextmanager
def nf4_targets_for_peft(model: nn.Module):
    """While PEFT injects LoRA (`target_parameters`): each 4-bit experts module under `model` holds, beside its codes,
    a placeholder parameter per expert tensor with the tensor's logical shape and dtype and no storage (one element
    expanded), which PEFT's search by parameter name finds. PEFT's wrapper then reads the tensor's shape, dtype and
    device through the module's attribute, the dequantising view (moe_nf4), never the placeholder, which is removed
    again on exit."""
    added = []
    for module in model.modules():
        if is_nf4(module):
            for name in EXPERT_TENSORS:
                codes = module._parameters[f"{name}_nf4"]
                placeholder = torch.empty((), dtype=module._nf4_dtype, device=codes.device)
                module._parameters[name] = nn.Parameter(placeholder.expand(module._nf4_shapes[name]),
                                                        requires_grad=False)
                added.append((module, name))
    try:
        yield
    finally:
        for module, name in added:
            module._parameters.pop(name, None)
