"""What the planner's rows read: the configuration resolved once per plan (PlanInputs), beside the model's
count. Rows for parameters and optimizer states are in memory/state_rows.py, activations in memory/planner.py."""
from __future__ import annotations

from dataclasses import dataclass

from vlm_finetune.memory.count import ModelCount
from vlm_finetune.precision import WeightsPolicy
from vlm_finetune.settings import RunSettings
from vlm_finetune.strategies import ZeroSizes, zero_knobs

ADAM_STATES = 2
# 4-bit codes, an 8-bit absmax per 64-element block and a float32 per 256 blocks (bitsandbytes' nested statistics)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class PlanInputs:
    """Everything the rows read from the configuration, resolved once per plan; what varies between the
    builds of one plan (tokens, micro-batch, images, checkpointed layers) is passed beside it."""

    dims: dict  # the family's memory_dims
    count: ModelCount
    modes: dict  # Part -> Mode
    strategy: str
    stage: int  # ZeRO stage; 0 unless DeepSpeed
    precision: str
    half: bool  # activations (and DeepSpeed's module) in 16 bits
    world: int
    offload_optimizer: bool
    offload_parameters: bool
    optimizer_name: str
    optimizer_states: int  # float32 states per trainable parameter
    lora_rank: int
    liger: bool
    loss_impl: str
    loss_chunk: int
    reduce_bucket: int = 0  # DeepSpeed's buckets, in elements
    allgather_bucket: int = 0
    prefetch_bucket: int = 0
    max_live_parameters: int = 0
    max_reuse_distance: int = 0  # ZeRO-3: a parameter used again within this many elements stays gathered
    reshard_after_forward: bool = True  # FSDP: each unit gathered again for the backward (FULL_SHARD)
    expert_lora_stacks: bool = False  # LoRA on fused MoE experts through PEFT's parametrization (W + delta per layer)
    expert_lora: bool = False  # LoRA on the fused MoE experts (either path)
    gathers_in_place: bool = False  # ZeRO-3 gathers straight into each parameter's buffer (no flat buffer to copy)
    prefetches_one_parameter: bool = False  # stage3_allgather_sequential: DeepSpeed sets the prefetch bucket to 1
    expert_parallel: int = 1  # ranks that split each MoE layer's experts (trainer.expert_parallel)

    @property
    def act_bytes(self) -> int:
        """Bytes of one activation element (and of a parameter gathered for compute)."""
        return 2 if self.half else 4

    @property
    def shards_parameters(self) -> bool:
        return self.strategy == "fsdp" or self.stage == 3

    @property
    def num_layers(self) -> int:
        return int(self.dims["layers"])

    @property
    def trainable_numel(self) -> int:
        return sum(group.numel for group in self.count.groups if group.kind != "frozen")


def plan_inputs(settings: RunSettings, dims: dict, count: ModelCount, modes: dict, world: int, policy: WeightsPolicy,
                expert_lora: bool) -> PlanInputs:
    """`expert_lora`: LoRA goes on the fused MoE expert tensors (Family.lora_target_parameters)."""
    trainer = settings.strategy
    strategy, stage = trainer.strategy, trainer.zero_stage
    loss, optimizer = settings.loss, settings.optimizer
    states = ADAM_STATES if optimizer.name == "adamw" else (1 if optimizer.momentum else 0)

    knobs = {}
    if strategy == "deepspeed":  # `auto` sized as the run sizes it, from the model's counts
        trainable = sum(group.numel for group in count.groups if group.kind != "frozen")
        knobs = zero_knobs(trainer, ZeroSizes(trainable, max(count.unit_numels or [0])))

    def elements(key: str) -> int:
        return knobs[key]

    return PlanInputs(
        dims=dims, count=count, modes=modes, strategy=strategy, stage=stage, precision=settings.precision,
        half=policy.half, world=world, offload_optimizer=trainer.offload_optimizer,
        offload_parameters=trainer.offload_parameters, optimizer_name=optimizer.name,
        optimizer_states=states, lora_rank=settings.lora.r, liger=settings.model.liger_kernels,
        loss_impl=loss.impl, loss_chunk=loss.chunk_size,
        reduce_bucket=elements("reduce_bucket_size") if strategy == "deepspeed" else 0,
        allgather_bucket=elements("allgather_bucket_size") if strategy == "deepspeed" and stage != 3 else 0,
        prefetch_bucket=elements("stage3_prefetch_bucket_size") if stage == 3 else 0,
        max_live_parameters=elements("stage3_max_live_parameters") if stage == 3 else 0,
        max_reuse_distance=elements("stage3_max_reuse_distance") if stage == 3 else 0,
        reshard_after_forward=trainer.sharding_strategy != "SHARD_GRAD_OP",
        expert_lora_stacks=expert_lora and settings.lora.expert_forward == "peft", expert_lora=expert_lora,
        gathers_in_place=stage == 3 and (trainer.gathers_sequentially
                                         or bool(trainer.deepspeed["stage3_use_all_reduce_for_fetch_params"])),
        prefetches_one_parameter=stage == 3 and trainer.gathers_sequentially,
        expert_parallel=trainer.expert_parallel)
