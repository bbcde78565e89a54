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
wrapper's own forward runs."""
from __future__ import annotations

import types

import torch
from torch import nn

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


class _FrozenExpertLinear(torch.autograd.Function):
    """x @ weight[e].T for a frozen fused expert tensor, saving the parameter itself for backward, never a slice
    of it. A slice (what `linear(x, weight[e])` saves) keeps the whole stack's storage alive until backward: under
    ZeRO-3 that is the layer's gathered experts, held from the forward to the backward of every MoE layer. The
    parameter's own data is what DeepSpeed gathers again for the layer's backward (its leaf module), as its own
    linear saves `weight`; in one process it is the weight, which is held anyway."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, expert: int) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.expert, ctx.x_dtype = expert, x.dtype
        return nn.functional.linear(x, weight[expert])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return (grad.to(weight.dtype) @ weight[ctx.expert]).to(ctx.x_dtype), None, None


def _linear(x: torch.Tensor, weight: torch.Tensor, factors, expert: torch.Tensor) -> torch.Tensor:
    if weight.requires_grad:  # experts trained fully: autograd's own linear (it needs x for the weight's gradient)
        out = nn.functional.linear(x, weight[expert])
    else:
        out = _FrozenExpertLinear.apply(x, weight, int(expert))
    if factors is None:
        return out
    lhs, rhs, scaling = factors  # delta_e = scaling * lhs[e] @ rhs[e], shaped like weight[e] (out x in)
    return out + scaling * nn.functional.linear(nn.functional.linear(x, rhs[expert]), lhs[expert])


def expert_loop(experts: nn.Module, factors: dict, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager expert loop (Mixtral, GLM-4.5V: the same), each expert's LoRA on its tokens only."""
    weights = {name: experts._parameters[name] for name in EXPERT_TENSORS}  # the raw tensors, no parametrization
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=experts.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in hit:
        expert = expert[0]
        if expert == experts.num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[expert])
        state = hidden_states[token_idx]
        gate, up = _linear(state, weights["gate_up_proj"], factors.get("gate_up_proj"), expert).chunk(2, dim=-1)
        state = _linear(experts.act_fn(gate) * up, weights["down_proj"], factors.get("down_proj"), expert)
        state = state * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, state.to(final.dtype))
    return final


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
    experts = {id(m) for _, m in expert_modules(model)}
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
