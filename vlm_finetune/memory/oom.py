"""The out-of-memory report of a training run: the phase it failed in, the sizes involved, PyTorch's allocator
snapshot (CUDA) and what the planner suggests, written into the run folder with no partial file left."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vlm_finetune.io import atomic_path, sweep_partial_files, write_atomic
from vlm_finetune.memory.monitor import CudaMemoryStats, GiB, MemoryMonitor, MemoryStats
from vlm_finetune.memory.suggest import SettingsFor, plan_with_suggestions

OOM_REPORT = "oom_report.txt"
OOM_SNAPSHOT = "oom_memory_snapshot.pickle"


class TrainingOutOfMemory(RuntimeError):
    """A CUDA out-of-memory error during training, after the report was written."""

    exit_code = 3


_SIZE = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")


def oom_report(run_dir: Path, error: BaseException, monitor: MemoryMonitor | None, overrides: list[str] | None,
               step: int | None = None, stats: MemoryStats | None = None,
               settings_for: SettingsFor | None = None) -> Path:
    """Write the memory snapshot (CUDA) and `oom_report.txt` into the run folder, atomically; returns the
    report's path. Names the phase, the sizes involved and the planner's suggestions (planned from the settings
    `settings_for` gives for the run's overrides)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stats = stats or (monitor.stats if monitor is not None else None)
    if stats is None and torch.cuda.is_available():
        stats = CudaMemoryStats()
    phase = monitor.phase if monitor is not None and monitor.stats is not None else "unknown (no memory monitor)"
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    asked = _SIZE.search(str(error))
    lines = ["CUDA out of memory during training", "",
             f"phase: {phase}" + (f" (optimizer step {step})" if step is not None else ""),
             f"error: {message}"]
    if asked:
        lines.append(f"allocation that failed: {asked.group(1)}")
    if stats is not None:
        lines += [f"allocated now: {stats.allocated() / GiB:.2f} GiB; reserved now: {stats.reserved() / GiB:.2f} GiB",
                  f"peak allocated in this phase: {stats.max_allocated() / GiB:.2f} GiB; peak reserved: "
                  f"{stats.max_reserved() / GiB:.2f} GiB"]
    if monitor is not None and monitor.records:
        worst = max(monitor.records, key=lambda record: record.peak_allocated)
        lines.append(f"highest completed phase before: {worst.phase} at step {worst.step}, "
                     f"{worst.peak_allocated / GiB:.2f} GiB allocated")
        monitor.flush()
    # PyTorch's allocator history (who allocated what), for https://pytorch.org/memory_viz
    snapshot = run_dir / OOM_SNAPSHOT
    if monitor is not None and monitor.history_recording:
        try:
            with atomic_path(snapshot) as tmp:
                torch.cuda.memory._dump_snapshot(str(tmp))
            lines.append(f"memory snapshot: {snapshot} (open it at https://pytorch.org/memory_viz)")
        except Exception as err:
            lines.append(f"memory snapshot: not written ({err})")
    elif not torch.cuda.is_available():
        lines.append("memory snapshot: not written (CPU run: PyTorch's allocator history is CUDA-only)")
    else:
        lines.append("memory snapshot: not written (the memory monitor was off: memory.monitor=true records it)")
    lines += ["", "what the planner suggests:"]
    lines += _planner_advice(overrides, settings_for)
    report = run_dir / OOM_REPORT
    write_atomic(report, "\n".join(lines) + "\n")
    return report


def _planner_advice(overrides: list[str] | None, settings_for: SettingsFor | None) -> list[str]:
    if overrides is None or settings_for is None:
        return ["  (the run's command-line overrides are unknown here) run: python -m vlm_finetune.plan <the same "
                "overrides as training>"]
    try:
        plan = plan_with_suggestions(settings_for(overrides), list(overrides), settings_for)
    except Exception as err:  # the report must be written whatever the planner thinks
        return [f"  planner unavailable: {err}",
                f"  run: python -m vlm_finetune.plan {' '.join(overrides)}"]
    out = [f"  predicted peak {plan.peak_bytes / GiB:.2f} GiB per GPU ({plan.verdict} on {plan.hardware}, "
           f"phase {plan.peak_phase})"]
    for suggestion in plan.suggestions:
        out.append(f"  - {suggestion.label}: predicted {suggestion.plan.peak_bytes / GiB:.2f} GiB\n"
                   f"    {suggestion.command}")
    if plan.fits is None:
        out.append("  the hardware profile has no GPU memory to compare with (set hardware= to the GPUs you ran on)")
    elif plan.fits:
        out.append("  the plan predicts this fits: the data (longer samples, more images) or fragmentation may "
                   "exceed what it assumes; try data.micro_batch_size smaller or model.activation_checkpointing=true")
    return out


def handle_oom(error: BaseException, run_dir: Path, trainer: Any, overrides: list[str] | None,
               settings_for: SettingsFor) -> TrainingOutOfMemory:
    """Report an out-of-memory error of a training run: snapshot + report, no partial files left. Returns
    the error to raise (with the report's path and the phase in its message)."""
    monitor = next((callback for callback in getattr(trainer, "callbacks", []) if isinstance(callback, MemoryMonitor)),
                   None)
    step = getattr(trainer, "global_step", None)
    report = oom_report(run_dir, error, monitor, overrides, step, settings_for=settings_for)
    sweep_partial_files(run_dir)
    phase = monitor.phase if monitor is not None and monitor.stats is not None else "unknown phase"
    return TrainingOutOfMemory(f"CUDA out of memory in {phase} at optimizer step {step}; report: {report}. "
                               f"Smaller data.micro_batch_size, model.activation_checkpointing=true or a sharded "
                               f"trainer (python -m vlm_finetune.plan lists what fits)")
