"""The planner's rows for what a run holds besides activations: parameters (in the dtype each group is held in,
sharded or quantised), gradients and optimizer states, and the sharding strategies' buffers."""
from __future__ import annotations

import math

import torch

from vlm_finetune.memory import fsdp_rows
from vlm_finetune.memory.count import ParamGroup
from vlm_finetune.memory.inputs import NF4_BYTES_PER_PARAM, PlanInputs
from vlm_finetune.memory.report import Row
from vlm_finetune.precision import is_nf4

PART_ORDER = ("vision", "projector", "llm", "other")  # the order of the parameter rows


def held_dtype(inputs: PlanInputs, group: ParamGroup) -> torch.dtype:
    """The dtype a parameter group is held in during training."""
    if inputs.strategy == "deepspeed" and inputs.half:
        # DeepSpeed casts the module to bf16/fp16 and keeps float32 masters in the optimizer
        return torch.bfloat16 if inputs.precision != "fp16-mixed" else torch.float16
    return group.dtype


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parameter_rows(inputs: PlanInputs) -> list[Row]:
    world = inputs.world
    rows: list[Row] = []
    for group in sorted(inputs.count.groups, key=lambda group: PART_ORDER.index(group.part)):
        dtype = held_dtype(inputs, group)
        size = _element_size(dtype)
        numel = group.numel
        label = f"{group.part} {group.kind} {str(dtype).removeprefix('torch.')}"
        count = inputs.count
        if is_nf4(inputs.precision) and group.part == "llm" and group.kind == "frozen":
            quantized = min(count.quantizable_numel, numel) if group.dtype == count.quantizable_dtype else 0
            experts = count.expert_numel if group.dtype == count.expert_dtype else 0  # fused MoE experts
            if inputs.shards_parameters:  # FSDP, ZeRO-3: each rank holds 1/N of the packed codes, statistics whole
                rows += fsdp_rows.four_bit_rows(inputs, quantized, bool(experts))
            else:
                if quantized:
                    rows.append(Row("parameters", "llm frozen nf4 (4-bit, double-quantised)",
                                    int(quantized * NF4_BYTES_PER_PARAM), four_bit=True))
                if experts:  # per expert; expert parallel: this rank's share
                    what = ("4-bit per expert, fp32 absmax per 64" if inputs.expert_parallel == 1
                            else "per expert" + _expert_share(inputs))
                    rows.append(Row("parameters", f"llm frozen experts nf4 ({what})",
                                    count.expert_nf4_bytes // inputs.expert_parallel, four_bit=True))
            numel -= quantized + experts
        elif (inputs.expert_parallel > 1 and group.part == "llm" and group.kind == "frozen" and count.expert_numel
              and group.dtype == count.expert_dtype):
            rows.append(Row("parameters", f"llm frozen experts {str(dtype).removeprefix('torch.')}"
                            + _expert_share(inputs), count.expert_numel // inputs.expert_parallel * size))
            numel -= count.expert_numel
        if inputs.shards_parameters:
            # ZeRO-3 partitions every parameter; those below the persistence threshold are also kept whole
            if group.persistent_numel:
                rows.append(Row("parameters", label + " (small, kept whole)", group.persistent_numel * size))
            offloaded = ", offloaded" if inputs.offload_parameters else ""
            rows.append(Row("parameters", label + f" (sharded 1/{world}{offloaded})", math.ceil(numel / world) * size,
                            "cpu" if inputs.offload_parameters else "gpu"))
        else:
            rows.append(Row("parameters", label, numel * size))
    return rows


def gathered_module_bytes(inputs: PlanInputs) -> int:
    """Bytes of the largest module ZeRO-3 gathers at once: its parameters in the compute dtype, and under nf4 its
    4-bit weights as their packed codes (half a byte each; the statistics are whole on every rank already)."""
    count = inputs.count
    if not is_nf4(inputs.precision) or not count.nf4_fetches:
        return count.largest_fetch_numel * inputs.act_bytes
    return int(max((numel - four_bit) * inputs.act_bytes + four_bit / 2 for numel, four_bit in count.nf4_fetches))


def _expert_share(inputs: PlanInputs) -> str:
    """The label's note on the experts a rank holds under expert parallelism."""
    return f", 1/{inputs.expert_parallel} per rank" if inputs.expert_parallel > 1 else ""


def optimizer_rows(inputs: PlanInputs) -> list[Row]:
    """Gradients and optimizer states."""
    world, states = inputs.world, inputs.optimizer_states
    trainable_numel = inputs.trainable_numel
    if inputs.strategy == "deepspeed":
        # ZeRO-2/3: half-precision gradients reduced into this rank's partition; a float32 copy of the
        # partition exists during the step
        partition = math.ceil(trainable_numel / world)
        where = "cpu" if inputs.offload_optimizer else "gpu"
        rows = [Row("gradients", f"trainable {'bf16' if inputs.half else 'fp32'} (partition 1/{world})",
                    partition * inputs.act_bytes)]
        if inputs.half:
            rows.append(Row("gradients", f"fp32 copy of the partition for the optimizer step (1/{world})",
                            partition * 4, where))
        # DeepSpeed's optimizer holds a float32 copy of the partition, under 32-true too (ZeRO-3 would reuse
        # float32 weights, but compares a device string with a torch.device and so always copies;
        # tests/test_zero_cpu.py measures it)
        master = 4
        rows.append(Row("optimizer", f"fp32 master + {states} AdamW states (partition 1/{world})",
                        partition * (master + 4 * states), where))
        return rows
    if inputs.strategy == "fsdp":
        return fsdp_rows.gradient_and_optimizer_rows(inputs, sum(
            group.numel * _element_size(held_dtype(inputs, group)) for group in inputs.count.groups
            if group.kind != "frozen"))
    gradient_bytes = sum(group.numel * _element_size(held_dtype(inputs, group))
                         for group in inputs.count.groups if group.kind != "frozen")
    return [Row("gradients", "trainable (dtype of each parameter)", gradient_bytes),
            Row("optimizer", f"{states} {inputs.optimizer_name} state(s) per trainable parameter",
                gradient_bytes * states)]


def strategy_rows(inputs: PlanInputs) -> list[Row]:
    """Buffers of the sharding strategies: DeepSpeed's buckets and gathered modules, FSDP's (memory/fsdp_rows.py)."""
    gathered_size = inputs.act_bytes  # parameters are gathered in the compute dtype
    count = inputs.count
    if inputs.strategy == "deepspeed":
        trainable_numel = inputs.trainable_numel
        if inputs.stage == 3:
            # DeepSpeed allocates the bucket whole (stage3.py: torch.empty(reduce_bucket_size)), however little trains
            rows = [Row("strategy", f"ZeRO-3 reduce bucket ({inputs.reduce_bucket:.2g} elements, allocated whole)",
                        inputs.reduce_bucket * gathered_size)]
            fetch = count.largest_fetch_numel
            module_bytes = gathered_module_bytes(inputs)
            if inputs.gathers_in_place:
                # stage3_allgather_sequential (each parameter into its own buffer) or the all-reduce fetch (into the
                # parameters' final buffers): the module held once
                rows.append(Row("strategy", "ZeRO-3 gathered module (straight into the parameters' buffers)",
                                module_bytes, in_flight="gather"))
            else:
                # a gathered module is materialised twice for a moment: DeepSpeed's coalesced all-gather lands in
                # one flat buffer, and its wait gives each parameter its own copy (torch.cat of the ranks' slices)
                # while the flat buffer is alive (partition_parameters.py, AllGatherCoalescedHandle.wait); the step's
                # peak in scripts/phase_peaks.py is that cat
                rows.append(Row("strategy", "ZeRO-3 gathered module (flat buffer + per-parameter copies)",
                                2 * module_bytes, in_flight="gather"))
            # after the first step a parameter used again within max_reuse_distance elements stays gathered: what
            # the forward leaves gathered for the backward, at most the model (census: every parameter when the
            # distance exceeds the model)
            # a distance within one gathered module keeps only the module in use (the row above)
            whole = sum(group.numel - group.persistent_numel for group in count.groups)
            kept = min(inputs.max_reuse_distance, whole) if inputs.max_reuse_distance > fetch else 0
            if inputs.prefetches_one_parameter:
                # stage3_allgather_sequential: DeepSpeed sets the prefetch bucket to 1 element (engine.py), so each
                # module's fetch prefetches one whole parameter of the trace, but every module fetches, the small
                # ones too: the prefetch walks ahead while fewer than stage3_max_live_parameters elements are
                # gathered, the last parameter overshooting by up to its size (a traced step on two CPU ranks: the
                # vision tower's small modules alone had the first decoder layers' expert stacks gathered, and the
                # census at the issue's width saw 2.7 layers' stacks, max_live plus one stack). A module at or above
                # max_live leaves nothing to prefetch beside it (Mixtral's experts under the 1e9 cap).
                # The limit counts every gathered parameter, those kept for reuse too (partitioned_param_coordinator:
                # __n_available_params).
                one = min(count.largest_param_numel or fetch, fetch)
                room = inputs.max_live_parameters - fetch - kept
                prefetched = room + one if room > 0 else 0
                rows.append(Row("strategy", "ZeRO-3 prefetch along the trace (sequential gather: a parameter per "
                                            "module fetch, up to stage3_max_live_parameters)",
                                int(prefetched * module_bytes / max(fetch, 1)), in_flight="trace"))
            else:  # the prefetch bucket's worth of the trace, within stage3_max_live_parameters
                live = min(fetch + min(inputs.prefetch_bucket, fetch), max(inputs.max_live_parameters, fetch))
                rows.append(Row("strategy", "ZeRO-3 prefetch of the next module",
                                int((live - fetch) * module_bytes / max(fetch, 1)), in_flight="trace"))
            rows.append(Row("strategy", f"ZeRO-3 parameters kept gathered for reuse (stage3_max_reuse_distance "
                                        f"{inputs.max_reuse_distance:.2g})", kept * gathered_size, in_flight="trace"))
        else:
            # stage 2 with overlap_comm: two buckets, allocated whole (stage_1_and_2.py: buf_0 and buf_1)
            rows = [Row("strategy", f"ZeRO-2 reduce buckets (2 x {inputs.reduce_bucket:.2g} elements, overlap_comm)",
                        2 * inputs.reduce_bucket * gathered_size)]
            rows.append(Row("strategy", "ZeRO-2 all-gather bucket (updated parameters)",
                            min(inputs.allgather_bucket, trainable_numel) * gathered_size))
        return rows
    if inputs.strategy == "fsdp":
        return fsdp_rows.strategy_rows(inputs)
    return []
