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
  inside its backward, on the same gather), less the last MoE block, kept from its forward to its backward by
  the reuse distance (`zero3_reused_bytes`), and a reduce-scatter of the trainable gradients per micro-batch.
- FSDP2 (trainer=fsdp): per micro-batch every parameter all-gathered for the forward in the compute dtype; for the
  backward again each unit (decoder layer, vision block) that runs one, resharded after its forward; the root
  unit (embeddings, head, projector, what of the towers is in no block) stays gathered from its forward to its
  backward (FSDP2 never reshards the root after forward), and a frozen vision tower (no_grad) has no backward;
  a reduce-scatter of the gradients of the trainable parameters, float32.
- nf4 under ZeRO-3 or FSDP: the 4-bit weights are gathered as their packed codes (half a byte per weight).
- Expert parallel (trainer=ddp trainer.expert_parallel=N): DDP's all-reduce, plus, per micro-batch and MoE
  layer, each of its T x top-k (token, expert) rows that belongs to another rank of the group ((N-1)/N of them
  under balanced routing) sent there and its output sent back, in the forward, again in the backward (the
  gradients), and again in the recompute of a checkpointed layer; each row's expert index travels with it."""
from __future__ import annotations

from dataclasses import dataclass

from vlm_finetune.memory.count import ParamGroup
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
    vision tower (it runs under torch.no_grad(), so it has no backward), and under FSDP2 only the units (the root
    is still gathered from its forward)."""
    frozen_vision = inputs.modes[Part.VISION] is Mode.FROZEN
    skip = {"vision"} if backward and frozen_vision else set()
    # nf4: the 4-bit weights travel as their packed codes, half a byte each (the statistics are whole on each rank)
    four_bit = inputs.count.quantizable_numel + inputs.count.expert_numel if is_nf4(inputs.precision) else 0
    if inputs.strategy == "fsdp":
        count = inputs.count
        numel = (sum(count.unit_numels) - (count.vision_unit_numel if frozen_vision else 0) if backward
                 else sum(g.numel for g in count.groups))
        return (numel - four_bit) * inputs.act_bytes + four_bit // 2
    total = 0.0
    for group in inputs.count.groups:
        if group.part in skip:
            continue
        size = _module_size(inputs, group)
        packed = min(four_bit, group.numel) if group.part == "llm" and group.kind == "frozen" else 0
        four_bit -= packed
        total += (group.numel - packed) * size + packed / 2
    return int(total)


def zero3_reused_bytes(inputs: PlanInputs) -> int:
    """ZeRO-3, once DeepSpeed knows the step's trace (every step after the first): a parameter met again within
    `stage3_max_reuse_distance` elements of its release stays gathered. The last decoder layer's MoE block (a ZeRO-3
    leaf, the last module of the forward) is next used by its own backward with only the final norm in between, so
    its backward gathers nothing (tests/test_comm.py; scripts/comm_bench.py: 3 of 8 block gathers per step
    fewer there, the other two kept by the prefetcher's look-ahead, which this does not model)."""
    if inputs.strategy != "deepspeed" or inputs.stage != 3 or not inputs.dims.get("moe_layers") \
            or inputs.max_reuse_distance <= 0 or not inputs.count.expert_numel:
        return 0
    group = ParamGroup("llm", "frozen", inputs.count.expert_dtype or inputs.count.groups[0].dtype, 0)
    return inputs.count.largest_fetch_numel * _module_size(inputs, group)


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
        name = "ZeRO-3" if inputs.strategy == "deepspeed" else "FSDP2"
        passes = gathered_bytes(inputs, backward=False) + gathered_bytes(inputs, backward=True)
        kept = zero3_reused_bytes(inputs)
        what = ("all-gathers, fwd + bwd (last MoE block reused)" if kept
                else "parameter all-gathers (forward and backward)")
        rows.append(CommRow(f"{name} {what}, {micro} micro-batch(es)", int(micro * ring(world) * (passes - kept))))
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

