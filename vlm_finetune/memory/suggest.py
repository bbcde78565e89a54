"""Changes that make a plan fit: for each kind of change, cheapest kind first, the first override set whose own
plan fits; when no single change does, the kinds combined in the same order. Every suggestion is re-planned
from its own overrides, so its prediction is the one `python -m vlm_finetune.plan` would print for it. The
settings of other overrides come from the caller (`settings_for`: the entry point composes them)."""
from __future__ import annotations

from typing import Callable

from vlm_finetune.config import group_options
from vlm_finetune.errors import ConfigError
from vlm_finetune.hardware import resolve
from vlm_finetune.memory.planner import plan_run, sample_geometry
from vlm_finetune.memory.report import MemoryPlan, Suggestion
from vlm_finetune.models.registry import get_family
from vlm_finetune.precision import is_nf4
from vlm_finetune.settings import RunSettings

SUGGESTION_ORDER = ("expert_parallel", "shard", "micro_batch", "checkpointing", "half_precision", "gather_in_place",
                    "offload", "nf4", "more_gpus")
SettingsFor = Callable[[list[str]], RunSettings]


def plan_with_suggestions(settings: RunSettings, overrides: list[str], settings_for: SettingsFor,
                          seq: int | None = None, image_px: int | None = None, images: int = 1) -> MemoryPlan:
    """The plan of `settings` (planner.plan_run) with, when it does not fit, the changes that make it fit."""
    plan = plan_run(settings, overrides, seq, image_px, images)
    if plan.fits is False:
        seq, image_px = sample_geometry(settings, seq, image_px)
        plan.suggestions = suggestions(list(overrides), plan, seq, image_px, images, settings, settings_for)
    return plan


def _replace(overrides: list[str], key: str, value: str) -> list[str]:
    kept = [override for override in overrides if override.split("=", 1)[0].lstrip("+") != key]
    return [*kept, f"{key}={value}"]


def _hardware_profiles() -> list[str]:
    return [name for name in group_options("hardware") if name not in ("auto", "cpu")]


def _candidates(overrides: list[str], plan: MemoryPlan, settings: RunSettings, settings_for: SettingsFor
                ) -> list[tuple[str, str, list[list[str]]]]:
    """(kind, label, override lists to try in order) for each kind of change, cheapest first."""
    strategy, stage = settings.strategy.strategy, settings.strategy.zero_stage
    shards_parameters = strategy == "fsdp" or stage == 3
    out = []
    spec = settings.model
    experts = int(get_family(spec.family).memory_dims(spec, spec.image_size).get("experts", 0))
    if experts and plan.world_size > 1 and settings.strategy.expert_parallel == 1:
        # each rank keeps E/N experts and only tokens move: fewest ranks per group first (least all_to_all)
        sizes = [n for n in range(2, plan.world_size + 1) if plan.world_size % n == 0 and experts % n == 0]
        base = _replace(overrides, "trainer", "ddp")
        out.append(("expert_parallel", "expert parallel (experts split over the ranks, tokens by all_to_all)",
                    [_replace(base, "trainer.expert_parallel", str(n)) for n in sizes]))
    if not shards_parameters and plan.world_size > 1:
        out.append(("shard", "shard parameters, gradients and optimizer states",
                    [_replace(overrides, "trainer", "zero3"), _replace(overrides, "trainer", "fsdp")]))
    micro_batch = plan.micro_batch_size
    if micro_batch > 1:
        accumulation = int(plan.accumulate_grad_batches)
        tries = []
        for smaller in sorted((size for size in range(1, micro_batch) if micro_batch % size == 0), reverse=True):
            changed = _replace(overrides, "data.micro_batch_size", str(smaller))
            same_global_batch = str(accumulation * micro_batch // smaller)
            tries.append(_replace(changed, "trainer.accumulate_grad_batches", same_global_batch))
        out.append(("micro_batch", "smaller micro-batch, more accumulation (same global batch)", tries))
    if plan.checkpointed_layers < plan.num_layers:
        out.append(("checkpointing", "activation checkpointing",
                    [_replace(overrides, "model.activation_checkpointing", "auto"),
                     _replace(overrides, "model.activation_checkpointing", "true")]))
    machine = resolve(settings.hardware)
    if settings.precision == "32-true" and machine.accelerator == "gpu":
        # the frozen base in 16 bits halves its bytes at no cost in speed: before offload, which costs steps
        half = "bf16-mixed" if machine.supports_bf16 else "fp16-mixed"
        out.append(("half_precision", f"precision={half} (the frozen base in 16 bits)",
                    [_replace(overrides, "precision", half)]))
    if stage == 3 and not settings.strategy.gathers_sequentially:
        out.append(("gather_in_place", "ZeRO-3 gathers each parameter into its own buffer (no flat-buffer copy, "
                                       "a parameter prefetched per module fetch: less overlap)",
                    [_replace(overrides, "trainer.stage3_allgather_sequential", "true")]))
    if not settings.strategy.offload_optimizer and not settings.strategy.offload_parameters:
        target = "zero3_offload" if shards_parameters else "zero2_offload"
        tries = [_replace(overrides, "trainer", target), _replace(overrides, "trainer", "zero3_offload")]
        if strategy == "fsdp":  # FSDP2's CPU offload first: the same engine
            tries.insert(0, _replace(overrides, "trainer", "fsdp_offload"))
        out.append(("offload", "offload to CPU memory", tries))
    if not is_nf4(settings.precision) and settings.model.path:
        tries = [_replace(overrides, "precision", "nf4")]
        if shards_parameters:  # 4-bit codes sharded by this trainer (FSDP2 and ZeRO-3 alike), or whole on each rank
            unsharded = "zero2" if plan.world_size > 1 else "single"
            tries += [_replace(_replace(overrides, "precision", "nf4"), "trainer", unsharded)]
        out.append(("nf4", "4-bit base (QLoRA)", tries))
    bigger = []
    for name in _hardware_profiles():
        hardware = settings_for([f"hardware={name}"]).hardware
        gpus = int(hardware.devices) * int(hardware.num_nodes)
        if gpus * float(hardware.gpu_memory_gib) > plan.world_size * plan.gpu_memory_gib:
            changed = _replace(overrides, "hardware", name)
            if gpus > 1 and strategy == "single":
                changed = _replace(changed, "trainer", "ddp")
            bigger.append(changed)
    if bigger:
        out.append(("more_gpus", "more or larger GPUs", bigger))
    return out


def _try(overrides: list[str], seq, image_px, images, settings_for: SettingsFor) -> MemoryPlan | None:
    try:
        return plan_run(settings_for(overrides), overrides, seq, image_px, images)
    except ConfigError:
        return None  # a combination the trainer refuses (e.g. nf4 with ZeRO-3) is no suggestion


def suggestions(overrides: list[str], plan: MemoryPlan, seq, image_px, images, settings: RunSettings,
                settings_for: SettingsFor) -> list[Suggestion]:
    """For each kind of change, cheapest kind first, the first override set whose own plan fits. When no
    single change fits, changes are combined in the same order until the plan fits."""
    found: list[Suggestion] = []
    for _kind, label, tries in _candidates(overrides, plan, settings, settings_for):
        for candidate in tries:
            candidate_plan = _try(candidate, seq, image_px, images, settings_for)
            if candidate_plan is not None and candidate_plan.fits:
                found.append(Suggestion(label, candidate, candidate_plan))
                break
    if found:
        return found
    combined, current, labels = list(overrides), plan, []
    for _ in range(len(SUGGESTION_ORDER)):
        step = None
        for _kind, label, tries in _candidates(combined, current, settings_for(combined), settings_for):
            best = None
            for candidate in tries:
                candidate_plan = _try(candidate, seq, image_px, images, settings_for)
                if candidate_plan is None or candidate_plan.peak_bytes >= current.peak_bytes:
                    continue
                if best is None or candidate_plan.peak_bytes < best[1].peak_bytes:
                    best = (candidate, candidate_plan)
            if best is not None:
                step = (label, *best)
                break
        if step is None:
            return []
        labels.append(step[0])
        combined, current = step[1], step[2]
        if current.fits:
            return [Suggestion(" + ".join(labels), combined, current)]
    return []
