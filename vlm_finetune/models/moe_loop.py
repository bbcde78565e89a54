"""The eager loop over fused MoE experts (Mixtral, GLM-4.5V: transformers' own loop, the same math), each expert on
its own tokens, with its LoRA factors when it has them (moe_lora.py), on 16-bit or 4-bit experts (moe_nf4.py).

No slice of a frozen expert tensor is saved for backward: a 16-bit expert's linear saves the parameter itself
(`_FrozenExpertLinear`), a 4-bit expert is dequantised again in backward (`_Nf4ExpertLinear`), so a layer never
keeps its experts' 16-bit matrices from the forward to the backward."""
from __future__ import annotations

import torch
from torch import nn


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


class _Nf4ExpertLinear(torch.autograd.Function):
    """x @ W_e.T for 4-bit expert e (moe_nf4): W_e is dequantised for the forward and dequantised again in backward
    for the input's gradient; nothing is saved (the codes are frozen and held by the module anyway), so a layer's
    backward never finds its experts' 16-bit matrices kept from the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, experts: nn.Module, name: str, expert: int) -> torch.Tensor:
        ctx.experts, ctx.name, ctx.expert, ctx.x_dtype = experts, name, expert, x.dtype
        return nn.functional.linear(x, getattr(experts, name)[expert])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = getattr(ctx.experts, ctx.name)[ctx.expert]
        return (grad.to(weight.dtype) @ weight).to(ctx.x_dtype), None, None, None


def is_nf4(experts: nn.Module) -> bool:
    return hasattr(experts, "_nf4_shapes")


def frozen_expert_linear(x: torch.Tensor, experts: nn.Module, name: str, expert: int) -> torch.Tensor:
    """x @ W_e.T for expert `expert` (an index into the tensors this module holds) of a frozen fused tensor, 16-bit
    or 4-bit, saving no slice of it for backward."""
    if is_nf4(experts):
        return _Nf4ExpertLinear.apply(x, experts, name, expert)
    return _FrozenExpertLinear.apply(x, experts._parameters[name], expert)


def _linear(x: torch.Tensor, experts: nn.Module, name: str, factors, expert: torch.Tensor) -> torch.Tensor:
    weight = None if is_nf4(experts) else experts._parameters[name]  # the raw tensor, no parametrization
    if weight is not None and weight.requires_grad:  # trained fully: autograd's own linear (needs x for the grad)
        out = nn.functional.linear(x, weight[expert])
    else:
        out = frozen_expert_linear(x, experts, name, int(expert))
    if factors is None:
        return out
    lhs, rhs, scaling = factors  # delta_e = scaling * lhs[e] @ rhs[e], shaped like weight[e] (out x in)
    return out + scaling * nn.functional.linear(nn.functional.linear(x, rhs[expert]), lhs[expert])


def expert_loop(experts: nn.Module, factors: dict, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager expert loop (Mixtral, GLM-4.5V: the same), each expert's LoRA on its tokens only."""
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
        gate, up = _linear(state, experts, "gate_up_proj", factors.get("gate_up_proj"), expert).chunk(2, dim=-1)
        state = _linear(experts.act_fn(gate) * up, experts, "down_proj", factors.get("down_proj"), expert)
        state = state * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, state.to(final.dtype))
    return final
