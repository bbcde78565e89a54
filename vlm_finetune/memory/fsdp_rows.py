"""The planner's rows for `trainer=fsdp` (FSDP2, vlm_finetune/fsdp.py): every parameter sharded 1/N in the dtype it
is held in (4-bit weights as their packed bytes), the trained weights' gradients and optimizer states sharded beside
them, and what a step holds whole: the root unit (embeddings, head, projector; FSDP2 keeps it gathered from its
forward to its backward), the unit in flight and the next one prefetched (both in the compute dtype, 4-bit bytes
for quantised weights), and the unit's unsharded gradients with their float32 reduce-scatter input. With
`SHARD_GRAD_OP` (no reshard after forward) every unit stays gathered from the forward to the backward."""
from __future__ import annotations

import math

from vlm_finetune.memory.inputs import NF4_BYTES_PER_PARAM, PlanInputs
from vlm_finetune.memory.report import Row
from vlm_finetune.precision import is_nf4


def _quantised_per_unit(inputs: PlanInputs) -> float:
    """Elements of one decoder layer held in 4 bits (nf4: its linear weights and experts), on average."""
    if not is_nf4(inputs.precision):
        return 0.0
    count = inputs.count
    return (count.quantizable_numel + count.expert_numel) / max(inputs.num_layers, 1)


def gathered_unit_bytes(inputs: PlanInputs) -> int:
    """The largest unit gathered for compute: its 4-bit weights as packed bytes, the rest in the compute dtype."""
    unit = max(inputs.count.unit_numels or [0])
    quantised = min(_quantised_per_unit(inputs), unit)
    return int((unit - quantised) * inputs.act_bytes + quantised * NF4_BYTES_PER_PARAM)


def four_bit_rows(inputs: PlanInputs, linear_numel: int, with_experts: bool) -> list[Row]:
    """nf4 under FSDP or ZeRO-3: the packed codes (two per byte) sharded 1/N (in host memory under parameter
    offload), the quantisation statistics (absmax, nested absmax, code books) whole on every rank (they are no
    parameters: neither engine shards them)."""
    world, count = inputs.world, inputs.count
    where, offloaded = ("cpu", ", offloaded") if inputs.offload_parameters else ("gpu", "")
    rows = []
    if linear_numel:
        # these elements' statistics (all the layers', or this group's share of them)
        stats = round(count.quantizable_stats_bytes * min(1.0, linear_numel / max(count.quantizable_numel, 1)))
        rows += [Row("parameters", f"llm frozen nf4 codes, linear layers (sharded 1/{world}{offloaded})",
                     math.ceil(linear_numel / 2 / world), where, four_bit=True),
                 Row("parameters", "llm frozen nf4 statistics, linear layers (whole on each rank)",
                     stats or int(linear_numel * (NF4_BYTES_PER_PARAM - 0.5)), four_bit=True)]
    if with_experts and count.expert_numel:
        codes = math.ceil(count.expert_numel / 2)
        rows += [Row("parameters", f"llm frozen nf4 codes, MoE experts (sharded 1/{world}{offloaded})",
                     math.ceil(codes / world), where, four_bit=True),
                 Row("parameters", "llm frozen nf4 statistics, MoE experts (whole on each rank)",
                     count.expert_nf4_bytes - codes, four_bit=True)]
    return rows


def gradient_and_optimizer_rows(inputs: PlanInputs, group_bytes: int) -> list[Row]:
    """`group_bytes`: the trained weights' bytes in the dtypes they are held in (their gradients have the same)."""
    world, states = inputs.world, inputs.optimizer_states
    where = "cpu" if inputs.offload_parameters else "gpu"
    offloaded = ", offloaded" if inputs.offload_parameters else ""
    unit_trainable = max(inputs.count.trainable_unit_numels or [0])
    return [
        Row("gradients", f"trainable, dtype of each parameter (sharded 1/{world}{offloaded})",
            math.ceil(group_bytes / world), where),
        Row("gradients", "the unit in backward: unsharded gradients (compute dtype) + fp32 reduce-scatter input",
            unit_trainable * (inputs.act_bytes + 4)),
        Row("optimizer", f"{states} {inputs.optimizer_name} state(s) fp32 (sharded 1/{world}{offloaded})",
            math.ceil(inputs.trainable_numel / world) * 4 * states, where),
    ]


def strategy_rows(inputs: PlanInputs) -> list[Row]:
    count = inputs.count
    unit = gathered_unit_bytes(inputs)
    whole = sum(group.numel for group in count.groups)
    root = max(0, whole - sum(count.unit_numels))
    rows = [Row("strategy", "FSDP2 root unit gathered for the step (embeddings, head, projector)",
                root * inputs.act_bytes)]
    if inputs.reshard_after_forward:
        rows += [Row("strategy", "FSDP2 unit in flight, gathered (compute dtype; nf4 as 4-bit bytes)", unit),
                 Row("strategy", "FSDP2 next unit prefetched", unit)]
    else:
        layers = len(count.unit_numels)
        rows.append(Row("strategy", f"FSDP2 SHARD_GRAD_OP: all {layers} units stay gathered forward to backward",
                        unit * layers))
    return rows
