"""`trainer=` names -> Lightning strategy objects: the combination checks made before anything loads, ZeRO's
buffer sizes (`auto` knobs), the DeepSpeed config, and the strategy built from the config and what the model
family declares (its decoder-layer and vision-block classes for wrapping, its ZeRO-3 leaf modules). What a
running strategy implies for the rest of the code is running_strategy.py's."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
from torch import nn

from vlm_finetune.errors import ConfigError
from vlm_finetune.fsdp import build_fsdp_strategy
from vlm_finetune.hardware import Hardware
from vlm_finetune.models._partitioned import unpartitioned
from vlm_finetune.models.base import Family
from vlm_finetune.precision import is_nf4
from vlm_finetune.settings import StrategySettings, is_auto
from vlm_finetune.zero3_nf4 import partitioning_first

SHARDED = ("fsdp", "deepspeed")




def check_combination(settings: StrategySettings, hardware: Hardware, precision: str) -> None:
    """Reject combinations that cannot work, naming the option and the fix."""
    strategy = settings.strategy
    if strategy == "single" and hardware.world_size > 1:
        raise ConfigError(f"trainer=single runs one process, but hardware={hardware.name} has {hardware.world_size} "
                          "devices; use trainer=ddp (model fits on one GPU) or trainer=zero3 / trainer=fsdp "
                          "(it does not)")
    if precision == "fp16-mixed" and hardware.accelerator != "gpu":
        raise ConfigError("precision=fp16-mixed needs a GPU (loss scaling is CUDA-only); "
                          "on the CPU use 32-true or bf16-mixed")
    if settings.offload_optimizer and strategy != "deepspeed":
        raise ConfigError("optimizer offload is a DeepSpeed feature; use trainer=zero2_offload or "
                          "trainer=zero3_offload (or trainer=fsdp_offload: parameters, gradients and the optimizer "
                          "step in host memory)")
    if settings.offload_parameters and strategy not in ("deepspeed", "fsdp"):
        raise ConfigError("trainer.offload_parameters=true needs a sharded strategy: trainer=fsdp_offload or "
                          "trainer=zero3_offload")
    if settings.offload_parameters and strategy == "deepspeed" and settings.zero_stage != 3:
        raise ConfigError("trainer.offload_parameters=true needs ZeRO stage 3 (trainer=zero3_offload)")
    size = settings.expert_parallel
    if size > 1:
        if strategy != "ddp":
            raise ConfigError(f"trainer.expert_parallel={size} is built for trainer=ddp (the experts split over the "
                              f"ranks, the rest data-parallel), not trainer={settings.name}"
                              + (": ZeRO-3 would gather every expert on every rank anyway" if settings.is_zero3
                                 else "") + "; use trainer=ddp trainer.expert_parallel=N")
        if hardware.world_size % size:
            raise ConfigError(f"trainer.expert_parallel={size} does not divide the {hardware.world_size} ranks of "
                              f"hardware={hardware.name}; use a divisor of {hardware.world_size}")


def check_expert_parallel(settings: StrategySettings, model_name: str, experts: int | None, trains_llm_fully: bool,
                          lora_on_experts: bool, expert_forward: str) -> None:
    """trainer.expert_parallel against the model (its experts per MoE layer, None for a dense model) and what
    trains, before any weight loads."""
    size = settings.expert_parallel
    if size == 1:
        return
    if not experts:
        raise ConfigError(f"trainer.expert_parallel={size}: model={model_name} is dense (no MoE experts); drop "
                          "trainer.expert_parallel or use an MoE model (mgm_8x7b, glm45v, tiny_mgm_moe, tiny_glm45v)")
    if experts % size:
        raise ConfigError(f"trainer.expert_parallel={size} does not divide the {experts} experts of each MoE layer "
                          f"of model={model_name}; use a divisor of {experts}")
    if trains_llm_fully:
        raise ConfigError(f"trainer.expert_parallel={size} keeps the experts frozen (LoRA on them or on the "
                          "attention); train.llm=full is not built with it: use train.llm=lora")
    if lora_on_experts and expert_forward != "per_expert":
        raise ConfigError(f"trainer.expert_parallel={size} runs each expert's LoRA on its own tokens "
                          "(lora.expert_forward=per_expert); lora.expert_forward=peft builds whole expert stacks")


@dataclass(frozen=True)
class ZeroSizes:
    """What ZeRO's `auto` knobs are sized from, in elements."""

    trainable_numel: int  # every trainable parameter (the gradients a bucket reduces)
    largest_unit_numel: int  # the largest decoder layer or vision block (gathered together under ZeRO-3)

    @classmethod
    def of(cls, model: nn.Module, family: Family) -> ZeroSizes:
        """Read from a model: whole, partitioned (ZeRO-3's `ds_numel`) or on the meta device."""
        def numel(p: torch.Tensor) -> int:
            return int(getattr(p, "ds_numel", p.numel()))

        units = tuple(family.decoder_layer_classes) + tuple(family.vision_block_classes)
        unit_numels = [sum(numel(p) for p in m.parameters()) for m in model.modules() if isinstance(m, units)]
        return cls(sum(numel(p) for p in model.parameters() if p.requires_grad), max(unit_numels or [0]))


# DeepSpeed's own defaults: what an `auto` bucket and live-parameter limit never exceed
AUTO_BUCKET_CAP = 500_000_000
AUTO_LIVE_CAP = 1_000_000_000


def zero_knobs(settings: StrategySettings, sizes: ZeroSizes) -> dict[str, int]:
    """The ZeRO sizes, in elements: a number in the trainer profile as given; `auto` sized from the model. Buckets
    hold every trainable gradient at most (DeepSpeed allocates a bucket whole, however little trains); ZeRO-3 keeps
    at most two of the largest layers gathered at once, and a parameter gathered for reuse only when it is used
    again within one such layer."""
    bucket = min(AUTO_BUCKET_CAP, max(sizes.trainable_numel, 1))
    unit = max(sizes.largest_unit_numel, 1)
    auto = {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
            "stage3_max_live_parameters": min(AUTO_LIVE_CAP, 2 * unit),
            "stage3_max_reuse_distance": min(AUTO_LIVE_CAP, unit)}
    knobs = {}
    for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", *auto):
        raw = settings.deepspeed[key]
        if key in auto and is_auto(raw):
            knobs[key] = auto[key]
            continue
        try:
            knobs[key] = int(float(raw))
        except (TypeError, ValueError):
            raise ConfigError(f"trainer.{key}={raw!r} must be a number of elements"
                              + (" or auto" if key in auto else "")) from None
    return knobs


def deepspeed_config(settings: StrategySettings, precision: str, micro_batch_size: int, on_gpu: bool,
                     sizes: ZeroSizes) -> dict:
    """The ZeRO config generated from the trainer profile (its `auto` sizes from `sizes`)."""
    stage = settings.zero_stage
    knobs = zero_knobs(settings, sizes)
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": knobs["reduce_bucket_size"],
        "allgather_bucket_size": knobs["allgather_bucket_size"],
    }
    if settings.offload_optimizer:
        # pinned host buffers speed up GPU<->CPU copies; CPU processes have none
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": knobs["stage3_prefetch_bucket_size"],
            "stage3_param_persistence_threshold": knobs["stage3_param_persistence_threshold"],
            "stage3_max_live_parameters": knobs["stage3_max_live_parameters"],
            "stage3_max_reuse_distance": knobs["stage3_max_reuse_distance"],
            "stage3_use_all_reduce_for_fetch_params":
                bool(settings.deepspeed["stage3_use_all_reduce_for_fetch_params"]),
            "stage3_allgather_sequential": settings.gathers_sequentially,
            # the adapter is gathered by us on save; never write a 16-bit copy of the whole model
            "stage3_gather_16bit_weights_on_model_save": False,
        })
        if settings.offload_parameters:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    # gradient_accumulation_steps and gradient_clipping are filled in by Lightning from the Trainer
    config = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "zero_allow_untested_optimizer": True,
    }
    if settings.offload_optimizer:
        # the optimizer is built by the module (torch AdamW, param groups); DeepSpeedCPUAdam would be
        # faster on offloaded states but needs its C++ op compiled on the machine
        config["zero_force_ds_cpu_optimizer"] = False
    if precision in ("bf16-mixed", "bf16-true", "nf4"):  # nf4 computes in bf16
        config["bf16"] = {"enabled": True}
    elif precision == "fp16-mixed":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def build_strategy(settings: StrategySettings, precision: str, micro_batch_size: int, family: Family,
                   hardware: Hardware, sizes: ZeroSizes):
    """The Lightning strategy for `trainer=`, or "auto" for one process (`sizes`: the model's, for ZeRO's auto
    knobs)."""
    check_combination(settings, hardware, precision)
    if settings.strategy == "single":
        return "auto"
    timeout = settings.collective_timeout
    if settings.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        backend = "nccl" if hardware.accelerator == "gpu" else "gloo"
        if settings.expert_parallel > 1:
            return expert_parallel_strategy(settings.expert_parallel, backend, timeout)
        # LoRA leaves most parameters frozen: no unused-parameter search, gradients as bucket views
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=False, gradient_as_bucket_view=True,
                           timeout=timeout)
    if settings.strategy == "fsdp":
        backend = "nccl" if hardware.accelerator == "gpu" else "gloo"
        return build_fsdp_strategy(settings, family, hardware.world_size, is_nf4(precision), backend, timeout)
    on_gpu = hardware.accelerator == "gpu"
    config = deepspeed_config(settings, precision, micro_batch_size, on_gpu, sizes)
    # nf4 under ZeRO-3: the 4-bit model, quantised whole on the host, is partitioned before the engine starts
    first = (lambda cls: partitioning_first(cls, config, precision)) if settings.is_zero3 and is_nf4(precision) \
        else (lambda cls: cls)
    if on_gpu:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        # checkpoints hold the trained weights and their optimizer partitions; the frozen base comes from the model
        return first(DeepSpeedStrategy)(config=config, exclude_frozen_parameters=True, timeout=timeout)
    return cpu_deepspeed_strategy(config, timeout, first)


def expert_parallel_strategy(size: int, backend: str, timeout: timedelta | None):
    """DDP whose ranks hold their own experts (models/moe_ep.py): the expert-parallel groups are made with the
    process group, and DDP neither broadcasts rank 0's experts over the others' at start nor reduces them."""
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    from vlm_finetune.models import moe_ep

    class ExpertParallelDDPStrategy(DDPStrategy):
        expert_parallel = size

        def setup_distributed(self) -> None:
            super().setup_distributed()
            moe_ep.init_groups(size)

        def _setup_model(self, model: nn.Module) -> DistributedDataParallel:
            moe_ep.check_shards(model, self.global_rank)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, moe_ep.sharded_expert_names(model))
            return super()._setup_model(model)

    return ExpertParallelDDPStrategy(process_group_backend=backend, find_unused_parameters=False,
                                     gradient_as_bucket_view=True, timeout=timeout)


def cpu_deepspeed_strategy(config: dict, timeout: timedelta | None = None, wrap=lambda cls: cls):
    """DeepSpeed ZeRO on CPU processes (DeepSpeed's CPU accelerator, gloo): the same partitioning, gathers,
    leaf modules and adapter consolidation as on GPUs, so a sharded configuration can be rehearsed with a
    tiny model on a laptop or in CI. Lightning allows DeepSpeed on CUDA only; this subclass lifts that check."""
    import torch
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        def setup_environment(self) -> None:
            from deepspeed.accelerator import get_accelerator

            found = get_accelerator().device_name()
            if found != "cpu":  # DeepSpeed picks its accelerator once per process, from what it detects
                raise ConfigError(f"hardware=cpu asks for CPU processes, but DeepSpeed chose its {found!r} "
                                  "accelerator on this machine; use a GPU hardware profile (hardware=auto), or "
                                  "set DS_ACCELERATOR=cpu to rehearse the run on CPU processes")
            DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

        def setup_distributed(self) -> None:  # without the check that devices are GPU indices
            reset_seed()
            self.set_world_ranks()
            with _without_shm_comm_op():
                self._init_deepspeed_distributed()

        @property
        def root_device(self):
            # Lightning hands DeepSpeed the device index as its device rank; give CPU devices the local rank
            return torch.device("cpu", self.local_rank)

    return wrap(CPUDeepSpeedStrategy)(config=config, process_group_backend="gloo", exclude_frozen_parameters=True,
                                      timeout=timeout or timedelta(minutes=10))


@contextlib.contextmanager
def _without_shm_comm_op() -> Iterator[None]:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (`deepspeed_shm_comm`) into
    ~/.cache/torch_extensions when its communicator starts. Every rank waits on one lock file while one rank
    compiles; a process killed during the compile leaves that lock behind, and every later CPU run waits on
    it forever (and on CPUs without AVX2/AVX-512 the kernel itself can hang its peers). The rehearsal needs
    none of it: without the op DeepSpeed reduces through torch.distributed (gloo), with the same numbers."""
    import importlib

    # by module name: the attribute `deepspeed.comm.torch` is the torch package that deepspeed.comm re-exports
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    original = ds_comm_torch.build_shm_op
    ds_comm_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_comm_torch.build_shm_op = original


# -- the configured strategy ---------------------------------------------------------------------------------
def set_zero3_leaves(model: nn.Module, family: Family, settings: StrategySettings) -> list[type]:
    """Under ZeRO-3, mark the family's leaf modules present in `model` (MoE blocks are gathered whole: their
    experts fire data-dependently, and a rank that skips an expert would leave the gathers out of step)."""
    if not settings.is_zero3:
        return []
    leaves = [c for c in family.zero3_leaf_classes if any(isinstance(m, c) for m in model.modules())]
    if leaves:
        from deepspeed.utils import set_z3_leaf_modules

        # DeepSpeed marks the leaves through `Module.apply`, which zero.Init (a model built partitioned in
        # configure_model) wraps to gather each module's parameters whole first: every MoE block's experts
        # (MGM-8x7B: 2.6 GiB a layer) would be gathered on every rank only to set a flag
        with unpartitioned():
            set_z3_leaf_modules(model, leaves)
    return leaves
