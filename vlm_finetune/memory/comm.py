"""The bytes each rank sends per optimizer step (it receives as many: every collective here is symmetric), by
strategy, and the seconds they cost at the hardware profile's link bandwidth (`interconnect_gbps`).

Each collective is counted at its bandwidth-optimal (ring) cost per rank, for N ranks and S bytes:
all-reduce 2 (N-1)/N S; all-gather of an S-byte result (N-1)/N S; reduce-scatter of an S-byte input (N-1)/N S;
all_to_all: the bytes a rank sends to the others. tests/test_comm.py counts the same way by wrapping the
collectives of real runs on CPU ranks.

- DDP: one all-reduce of the trainable gradients per optimizer step (Lightning skips the sync while it
  accumulates).
- ZeRO-2: an all-reduce of the trainable gradients per micro-batch (DeepSpeed's default bucket all-reduce; each
  rank then keeps its partition), an all-gather of the updated trainable parameters per step (both in the
  module's dtype).
- ZeRO-3: every parameter all-gathered for the forward and again for the backward of each micro-batch (a
  frozen vision tower, run under no_grad, only for the forward; the recompute of a checkpointed layer runs
  inside its backward, on the same gather), and a reduce-scatter of the trainable gradients per micro-batch.
- nf4 under ZeRO-3 or FSDP: the 4-bit weights are gathered as their packed codes (half a byte per weight).
- FSDP (computed, not yet measured here): the same gathers as ZeRO-3 (resharded after the forward) and a
  reduce-scatter of the gradients of the trainable parameters, float32, per micro-batch.
- Expert parallel (trainer=ddp trainer.expert_parallel=N): DDP's all-reduce, plus, per micro-batch and MoE
  layer, each of its T x top-k (token, expert) rows that belongs to another rank of the group ((N-1)/N of them
  under balanced routing) sent there and its output sent back, in the forward, again in the backward (the
  gradients), and again in the recompute of a checkpointed layer; each row's expert index travels with it."""
from __future__ import annotations

from dataclasses import dataclass

from vlm_finetune.memory.inputs import PlanInputs
from vlm_finetune.memory.report import Row
from vlm_finetune.memory.state_rows import held_dtype
from vlm_finetune.models.base import Mode, Part
from vlm_finetune.precision import is_nf4

INDEX_BYTES = 8  # the int64 expert index each dispatched row carries (models/moe_ep.py)


@dataclass(frozen=True)
class CommRow:
    item: str
    bytes: int  # sent per rank per optimizer step


def ring(world: int) -> float:
    """(N-1)/N: the share of an all-gather's result (or a reduce-scatter's input) a rank sends."""
    return (world - 1) / world if world > 1 else 0.0


def _element_size(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _module_size(inputs: PlanInputs, group) -> int:
    """Bytes per element of a group as the strategy communicates it (DeepSpeed's module is cast to 16 bits)."""
    return _element_size(held_dtype(inputs, group))


def trainable_bytes(inputs: PlanInputs) -> int:
    return sum(g.numel * _module_size(inputs, g) for g in inputs.count.groups if g.kind != "frozen")


def gathered_bytes(inputs: PlanInputs, backward: bool) -> int:
    """What ZeRO-3 / FSDP gathers for one pass over the model: every parameter for the forward (counted on CPU
    ranks, ZeRO-3 gathers the small persistent ones at each use as well); for the backward, all but a frozen
    vision tower (it runs under torch.no_grad(), so it has no backward)."""
    skip = {"vision"} if backward and inputs.modes[Part.VISION] is Mode.FROZEN else set()
    # nf4: the 4-bit weights travel as their packed codes, half a byte each (the statistics are whole on each rank)
    four_bit = inputs.count.quantizable_numel + inputs.count.expert_numel if is_nf4(inputs.precision) else 0
    total = 0.0
    for group in inputs.count.groups:
        if group.part in skip:
            continue
        size = inputs.act_bytes if inputs.strategy == "fsdp" else _module_size(inputs, group)
        packed = min(four_bit, group.numel) if group.part == "llm" and group.kind == "frozen" else 0
        four_bit -= packed
        total += (group.numel - packed) * size + packed / 2
    return int(total)


def expert_rows_per_layer(inputs: PlanInputs, tokens: int) -> float:
    """(token, expert) rows one rank sends to the other ranks of its group, per MoE layer and micro-batch."""
    size = inputs.expert_parallel
    return tokens * int(inputs.dims.get("experts_per_token", 0)) * ring(size)


def communication_rows(inputs: PlanInputs, tokens: int, accumulate: int, checkpointed_layers: int) -> list[CommRow]:
    """Bytes each rank sends per optimizer step (`tokens` per micro-batch per rank, `accumulate` micro-batches),
    one row per kind of collective."""
    world, micro = inputs.world, accumulate
    if world < 2:
        return []
    grads = trainable_bytes(inputs)
    rows: list[CommRow] = []
    if inputs.strategy == "ddp":
        rows.append(CommRow("DDP all-reduce of the trainable gradients, once per step", int(2 * ring(world) * grads)))
    elif inputs.strategy == "deepspeed" and inputs.stage != 3:
        # DeepSpeed's default (use_multi_rank_bucket_allreduce): each gradient bucket is all-reduced, not reduced
        # to its owner (stage_1_and_2.average_tensor); measured in tests/test_comm.py
        rows.append(CommRow(f"ZeRO-2 all-reduce of the gradient buckets, {micro} micro-batch(es)",
                            int(micro * 2 * ring(world) * grads)))
        rows.append(CommRow("ZeRO-2 all-gather of the updated trainable parameters", int(ring(world) * grads)))
    elif inputs.strategy in ("deepspeed", "fsdp"):
        name = "ZeRO-3" if inputs.strategy == "deepspeed" else "FSDP"
        passes = gathered_bytes(inputs, backward=False) + gathered_bytes(inputs, backward=True)
        rows.append(CommRow(f"{name} parameter all-gathers (forward and backward), {micro} micro-batch(es)",
                            int(micro * ring(world) * passes)))
        reduced = grads if inputs.strategy == "deepspeed" else sum(
            g.numel for g in inputs.count.groups if g.kind != "frozen") * 4
        rows.append(CommRow(f"{name} reduce-scatter of the gradients, {micro} micro-batch(es)",
                            int(micro * ring(world) * reduced)))
    if inputs.expert_parallel > 1:
        moe_layers = int(inputs.dims.get("moe_layers", 0))
        recomputed = max(0, min(checkpointed_layers, inputs.num_layers) - (inputs.num_layers - moe_layers))
        per_layer = expert_rows_per_layer(inputs, tokens)
        hidden = int(inputs.dims["hidden"]) * inputs.act_bytes
        forward = per_layer * (2 * hidden + INDEX_BYTES)  # rows out with their index, outputs back
        backward = per_layer * 2 * hidden
        total = micro * (moe_layers * (forward + backward) + recomputed * forward)
        rows.append(CommRow(f"expert all_to_all, {moe_layers} MoE layers ({recomputed} recomputed), "
                            f"{micro} micro-batch(es)", int(total)))
    return rows


def all_to_all_buffer_rows(inputs: PlanInputs, tokens: int) -> list[Row]:
    """Expert parallel: what one MoE layer's dispatch holds while it runs (the rows sent, received, their
    outputs and the outputs returned, each T x top-k x hidden), beyond what its activations save."""
    if inputs.expert_parallel < 2 or not inputs.dims.get("moe_layers"):
        return []
    rows = tokens * int(inputs.dims["experts_per_token"])
    return [Row("strategy", f"expert all_to_all buffers, one MoE layer (4 x {rows} rows)",
                4 * rows * int(inputs.dims["hidden"]) * inputs.act_bytes)]


def experts_per_rank(inputs: PlanInputs) -> str | None:
    experts = int(inputs.dims.get("experts", 0))
    if not experts or inputs.expert_parallel < 2:
        return None
    return f"{experts // inputs.expert_parallel} of {experts} experts per MoE layer on each rank " \
           f"(trainer.expert_parallel={inputs.expert_parallel}); tokens travel by all_to_all"

