"""Expert parallelism for the fused MoE experts of Mixtral (MGM-8x7B) and GLM-4.5V (trainer.expert_parallel=N).

Within each group of N consecutive ranks, rank i keeps experts [i*E/N, (i+1)*E/N) of every MoE layer (the fused
gate_up_proj / down_proj tensors, or their nf4 codes and absmax, cut along the expert dimension) and drops the
rest. The model's own MoE block is untouched: its router (softmax top-2 for Mixtral; sigmoid scores, the
score-correction bias, group-limited top-k and the routed scaling for GLM-4.5V) and its shared expert run as
released; only the experts module's forward(hidden_states, top_k_index, top_k_weights) changes:

1. every (token, k) pair goes to the rank that holds its expert (one all_to_all of the rows, dropless: the
   counts are exchanged first, so every rank receives exactly the rows routed to its experts),
2. that rank runs each of its experts on the rows sent to it (with the expert's LoRA factors, see moe_lora.py),
3. the outputs come back by the reverse all_to_all, and the sending rank weights them by its router's weights
   and sums them per token, as transformers' eager loop does.

Both all_to_alls are differentiable (the backward of one is the other with the splits swapped), so gradients
reach the hidden states and the router of the rank the token came from. The experts' own weights stay frozen
(LoRA or 4-bit base); their LoRA factors are small (rank r) and replicated on every rank like the rest of the
adapter, so DDP averages them as it does any parameter: only the owner of expert e gives its factors a
non-zero gradient (the sum over every rank's tokens routed to e), and DDP's mean over the world is exactly the
one process's gradient of the mean loss. The adapter is therefore saved in the normal layout, whole."""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from vlm_finetune.models.moe_loop import frozen_expert_linear
from vlm_finetune.models.moe_lora import _factors, _param_wrapper_class, _wrapper_chain
from vlm_finetune.models.moe_nf4 import EXPERT_TENSORS, expert_modules

# the process group of each rank's expert-parallel group, made once the default group exists (init_groups)
_GROUPS: dict[int, object] = {}


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this rank holds: experts [first, first + local) of `total`, in a group of `size` ranks."""

    size: int
    rank: int  # within the group
    total: int

    @property
    def local(self) -> int:
        return self.total // self.size

    @property
    def first(self) -> int:
        return self.rank * self.local


def init_groups(size: int) -> None:
    """Make the expert-parallel process groups (ranks [g*size, (g+1)*size)); every rank must call this, once the
    default process group exists."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == size:
        _GROUPS[size] = dist.group.WORLD
        return
    for start in range(0, world, size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            _GROUPS[size] = group


def group_of(size: int):
    if size not in _GROUPS:
        raise RuntimeError("expert parallelism: the process groups were not made (moe_ep.init_groups runs in the "
                           "strategy's setup_distributed)")
    return _GROUPS[size]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with given split sizes; its backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = rows.new_empty((sum(receive), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=receive, input_split_sizes=send,
                               group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.receive,
                               group=ctx.group)
        return back, None, None, None


def all_to_all_rows(rows: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(rows, send, receive, group)


def _exchange_counts(send: torch.Tensor, group) -> torch.Tensor:
    receive = torch.empty_like(send)
    dist.all_to_all_single(receive, send, group=group)
    return receive


def _local_linear(x: torch.Tensor, experts: nn.Module, name: str, local: int, factor, global_expert: int):
    out = frozen_expert_linear(x, experts, name, local)  # 16-bit, or nf4 dequantised one expert at a time
    if factor is None:
        return out
    lhs, rhs, scaling = factor  # the adapter keeps every expert's factors: index by the global expert
    return out + scaling * nn.functional.linear(nn.functional.linear(x, rhs[global_expert]), lhs[global_expert])


def _run_local_experts(experts: nn.Module, shard: ExpertShard, factors: dict, rows: torch.Tensor,
                       local_ids: torch.Tensor) -> torch.Tensor:
    """Each local expert on the rows sent to it (unweighted outputs, in the rows' order)."""
    out = rows.new_zeros(rows.shape)
    for local in torch.unique(local_ids).tolist():
        index = (local_ids == local).nonzero().squeeze(1)
        state = rows[index]
        global_expert = shard.first + local
        gate, up = _local_linear(state, experts, "gate_up_proj", local, factors.get("gate_up_proj"),
                                 global_expert).chunk(2, dim=-1)
        state = _local_linear(experts.act_fn(gate) * up, experts, "down_proj", local, factors.get("down_proj"),
                              global_expert)
        out = out.index_copy(0, index, state.to(out.dtype))
    return out


def dispatch_experts(experts: nn.Module, shard: ExpertShard, factors: dict, hidden_states: torch.Tensor,
                     top_k_index: torch.Tensor, top_k_weights: torch.Tensor, group) -> torch.Tensor:
    """The experts' output for this rank's tokens, computed where the experts live."""
    tokens, k = top_k_index.shape
    expert = top_k_index.reshape(-1)
    token = torch.arange(tokens, device=expert.device).repeat_interleave(k)
    owner = torch.div(expert, shard.local, rounding_mode="floor")
    order = torch.argsort(owner, stable=True)  # rows grouped by the rank they go to
    send = torch.bincount(owner, minlength=shard.size)
    receive = _exchange_counts(send, group)
    send_sizes, receive_sizes = send.tolist(), receive.tolist()
    rows = all_to_all_rows(hidden_states[token[order]], send_sizes, receive_sizes, group)
    local_ids = all_to_all_rows((expert[order] - owner[order] * shard.local).unsqueeze(1), send_sizes,
                                receive_sizes, group).squeeze(1)
    outputs = _run_local_experts(experts, shard, factors, rows, local_ids)
    back = all_to_all_rows(outputs, receive_sizes, send_sizes, group)  # in `order`
    weights = top_k_weights.reshape(-1)[order]
    final = torch.zeros_like(hidden_states)
    return final.index_add(0, token[order], (back * weights[:, None]).to(final.dtype))


def _ep_forward(self, hidden_states, top_k_index, top_k_weights):
    chain = _wrapper_chain(self)
    experts = chain[-1].base_layer if chain else self
    factors = _factors(chain) if chain else {}
    if factors is None:
        if any(w.merged for w in chain):
            raise RuntimeError("expert parallelism: a LoRA merged into sharded experts; merge on the whole "
                               "model (python -m vlm_finetune.export)")
        factors = {}  # adapters disabled: the base experts alone
    return dispatch_experts(experts, experts._expert_shard, factors, hidden_states, top_k_index, top_k_weights,
                            group_of(experts._expert_shard.size))


def _cut(tensor: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    return tensor.detach()[shard.first:shard.first + shard.local].clone()


def shard_experts(model: nn.Module, size: int, global_rank: int) -> int:
    """Keep this rank's E/size experts of every fused experts module under `model` (after LoRA and nf4 were
    applied) and give the module, or its outermost LoRA wrapper, the dispatching forward. Returns the number of
    experts modules sharded."""
    wrapper_cls = _param_wrapper_class()
    found = expert_modules(model) + [(n, m) for n, m in model.named_modules() if hasattr(m, "_nf4_shapes")]
    count = 0
    for _, experts in {id(m): (n, m) for n, m in found}.values():
        total = int(experts.num_experts)
        shard = ExpertShard(size, global_rank % size, total)
        if total % size:
            raise ValueError(f"{total} experts cannot be split over {size} ranks")
        if hasattr(experts, "_nf4_shapes"):
            for name in EXPERT_TENSORS:
                codes = experts._parameters[f"{name}_nf4"]
                cut = nn.Parameter(_cut(codes, shard), requires_grad=False)
                cut.quant_state = types.SimpleNamespace(shape=(shard.local, *codes.quant_state.shape[1:]))
                experts._parameters[f"{name}_nf4"] = cut
                experts._buffers[f"{name}_absmax"] = _cut(experts._buffers[f"{name}_absmax"], shard)
                experts._nf4_shapes[name] = (shard.local, *experts._nf4_shapes[name][1:])
        else:
            for name in EXPERT_TENSORS:
                weight = experts._parameters[name]
                if weight.requires_grad:
                    raise ValueError("expert parallelism keeps the experts frozen (LoRA on them, or none)")
                experts._parameters[name] = nn.Parameter(_cut(weight, shard), requires_grad=False)
        experts._expert_shard = shard
        experts.forward = types.MethodType(_ep_forward, experts)
        count += 1
    # LoRA on the experts: the outermost wrapper's forward dispatches (its factors, the base's shard)
    for parent in model.modules():
        if isinstance(parent, wrapper_cls):
            continue
        for child in parent.children():
            chain = _wrapper_chain(child)
            if chain and hasattr(chain[-1].base_layer, "_expert_shard"):
                child.forward = types.MethodType(_ep_forward, child)
    return count


def check_shards(module: nn.Module, global_rank: int) -> None:
    """The experts were cut (at the build, from the launcher's rank) for the rank the process group gave."""
    for sub in module.modules():
        shard = getattr(sub, "_expert_shard", None)
        if shard is not None and shard.rank != global_rank % shard.size:
            raise RuntimeError(f"expert parallelism: this process holds the experts of group rank {shard.rank}, but "
                               f"it is global rank {global_rank} (group rank {global_rank % shard.size}); the "
                               "launcher's RANK / SLURM_PROCID did not match the process group's rank")


def sharded_expert_names(module: nn.Module) -> list[str]:
    """Qualified names of the parameters and buffers that differ per rank (DDP must neither broadcast nor reduce
    them)."""
    names = []
    for prefix, sub in module.named_modules():
        if hasattr(sub, "_expert_shard"):
            for name, _ in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False)):
                if not name.endswith("_code"):  # the nf4 code book is the same on every rank
                    names.append(f"{prefix}.{name}" if prefix else name)
    return names


def expert_bytes(model: nn.Module) -> int:
    """Bytes this rank holds of fused expert weights (float tensors, or nf4 codes and absmax)."""
    total = 0
    for _, sub in model.named_modules():
        if hasattr(sub, "_nf4_shapes"):
            total += sum(getattr(sub, f"{t}_{p}").nbytes for t in EXPERT_TENSORS for p in ("nf4", "absmax"))
        elif all(isinstance(sub._parameters.get(t), torch.Tensor) for t in EXPERT_TENSORS):
            total += sum(sub._parameters[t].nbytes for t in EXPERT_TENSORS)
    return total
