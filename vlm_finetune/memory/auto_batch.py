"""`data.micro_batch_size=auto` (the default on GPU profiles): the global batch it keeps, the micro-batch and
accumulation that keep it, and whether the choice is the memory plan's or a search with real steps on the GPU."""
from __future__ import annotations

from typing import Any, Callable

from vlm_finetune.errors import ConfigError
from vlm_finetune.memory.search import largest_micro_batch
from vlm_finetune.settings import RunSettings, is_auto


def searched_with_real_steps(settings: RunSettings, accelerator: str) -> bool:
    """Micro-batch auto on a GPU with every device holding the model (trainer=single|ddp) is searched with real
    training steps at run time; under sharding (ZeRO, FSDP) the memory plan chooses it before the build."""
    return (is_auto(settings.data.micro_batch_size) and accelerator == "gpu"
            and settings.strategy.replicates_model)


def kept_global_batch(settings: RunSettings, world_size: int) -> tuple[int, str]:
    """(samples per optimizer step over all devices, where the number comes from): `data.global_batch_size` when
    given, else data.batch_per_device x trainer.accumulate_grad_batches x devices."""
    given = settings.data.global_batch_size
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ConfigError(f"data.global_batch_size={given!r} must be a positive number of samples per optimizer "
                              "step over all GPUs")
        if given % world_size:
            raise ConfigError(f"data.global_batch_size={given} is not divisible by the {world_size} devices of the "
                              "hardware profile")
        return given, "data.global_batch_size"
    per_device = settings.data.batch_per_device
    if isinstance(per_device, bool) or not isinstance(per_device, int) or per_device < 1:
        raise ConfigError("data.micro_batch_size=auto keeps the global batch the same: set data.batch_per_device "
                          "(samples per device per optimizer step) or +data.global_batch_size=<samples per optimizer "
                          "step over all GPUs>")
    accumulation = int(settings.accumulate_grad_batches)
    return (per_device * accumulation * world_size,
            f"data.batch_per_device {per_device} x trainer.accumulate_grad_batches {accumulation} x {world_size}")


def micro_batch_for_global(found: int, global_batch: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation): the largest micro-batch <= found that divides the per-device share of the
    global batch, and the accumulation that keeps the global batch exactly."""
    per_device = global_batch // world_size
    micro = max(d for d in range(1, min(found, per_device) + 1) if per_device % d == 0)
    return micro, per_device // micro


def plan_micro_batch(plan_for: Callable[[int], Any], settings: RunSettings, world_size: int,
                     accelerator: str) -> tuple[int, int, str]:
    """(micro-batch, accumulation, what was chosen and why) for micro-batch auto from the memory plan: the largest
    micro-batch whose plan fits that divides the per-device share of the global batch (1 when none fits)."""
    global_batch, source = kept_global_batch(settings, world_size)
    found = largest_micro_batch(plan_for, global_batch // world_size)
    micro, accumulation = micro_batch_for_global(found, global_batch, world_size)
    how = ("real training steps on the GPU choose it at run time; the plan assumes the largest it predicts fits"
           if searched_with_real_steps(settings, accelerator) else "the largest the plan fits")
    if plan_for(micro).fits is False:
        how = "none fits; the plan shows the smallest"
    return micro, accumulation, (f"data.micro_batch_size=auto: micro-batch {micro} x accumulation {accumulation} x "
                                 f"{world_size} device(s) = global batch {global_batch} ({source}), {how}")
