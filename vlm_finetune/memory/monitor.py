"""Memory while training: a monitor callback (peak allocated / reserved per step and phase, CSV + PNG in
the run folder, recurring spikes named with their phase and period).

The monitor reads memory through a small provider interface (`MemoryStats`) so that it is tested on the
CPU with a fake provider; on GPUs it reads torch.cuda's allocator statistics.
"""
from __future__ import annotations

import csv
import io
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import lightning as L
import torch

from vlm_finetune.io import atomic_path, write_atomic
from vlm_finetune.models.base import Part
from vlm_finetune.trainability import unwrap

log = logging.getLogger(__name__)
GiB = 2**30
PHASES = ("data loading", "vision forward", "LLM forward", "backward", "optimizer step", "validation",
          "checkpoint save")
CSV_NAME = "memory.csv"
PNG_NAME = "memory.png"


class MemoryStats(Protocol):
    """What the monitor needs from the device: peaks since the last reset, and the reset."""

    def max_allocated(self) -> int: ...

    def max_reserved(self) -> int: ...

    def allocated(self) -> int: ...

    def reserved(self) -> int: ...

    def reset_peak(self) -> None: ...


class CudaMemoryStats:
    """torch.cuda's caching-allocator statistics of the current device."""

    def max_allocated(self) -> int:
        return int(torch.cuda.max_memory_allocated())

    def max_reserved(self) -> int:
        return int(torch.cuda.max_memory_reserved())

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated())

    def reserved(self) -> int:
        return int(torch.cuda.memory_reserved())

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats()


@dataclass
class PhaseRecord:
    time_s: float  # seconds since fit start, at the end of the phase
    step: int  # optimizer step (trainer.global_step) the phase belongs to
    phase: str
    peak_allocated: int
    peak_reserved: int


@dataclass
class Spike:
    phase: str
    count: int
    period_s: float
    period_steps: float
    excess_bytes: int

    def describe(self) -> str:
        return (f"every {self.period_s:.0f} s ({self.period_steps:.0f} steps), "
                f"+{self.excess_bytes / GiB:.1f} GiB: {self.phase}")


def find_spikes(records: list[PhaseRecord], min_excess_bytes: int = GiB // 2, min_relative: float = 0.1,
                min_count: int = 2) -> list[Spike]:
    """Recurring spikes: phase peaks that exceed the run's typical peak (the median of every phase peak)
    by at least `min_excess_bytes` and `min_relative` of it, grouped by phase, kept when a phase spikes at
    least `min_count` times; the period is the median interval between its spikes. Largest first."""
    if not records:
        return []
    typical = statistics.median(r.peak_allocated for r in records)
    threshold = max(min_excess_bytes, min_relative * typical)
    by_phase: dict[str, list[PhaseRecord]] = {}
    for r in records:
        if r.peak_allocated - typical >= threshold:
            by_phase.setdefault(r.phase, []).append(r)
    spikes = []
    for phase, hits in by_phase.items():
        if len(hits) < min_count:
            continue
        seconds = [b.time_s - a.time_s for a, b in zip(hits, hits[1:])]
        steps = [b.step - a.step for a, b in zip(hits, hits[1:])]
        excess = int(statistics.median(h.peak_allocated - typical for h in hits))
        spikes.append(Spike(phase, len(hits), statistics.median(seconds), statistics.median(steps), excess))
    return sorted(spikes, key=lambda s: -s.excess_bytes)


def write_csv(records: list[PhaseRecord], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["time_s", "step", "phase", "peak_allocated_gib", "peak_reserved_gib"])
    for r in records:
        writer.writerow([f"{r.time_s:.3f}", r.step, r.phase, f"{r.peak_allocated / GiB:.4f}",
                         f"{r.peak_reserved / GiB:.4f}"])
    write_atomic(path, buffer.getvalue())


def read_csv(path: Path) -> list[PhaseRecord]:
    with open(path) as handle:
        return [PhaseRecord(float(row["time_s"]), int(row["step"]), row["phase"],
                            int(float(row["peak_allocated_gib"]) * GiB), int(float(row["peak_reserved_gib"]) * GiB))
                for row in csv.DictReader(handle)]


def plot_timeline(records: list[PhaseRecord], path: Path, spikes: list[Spike] = ()) -> Path | None:
    """Peak allocated and reserved memory of every phase over time, coloured by phase."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    times = [r.time_s for r in records]
    ax.plot(times, [r.peak_reserved / GiB for r in records], color="0.7", lw=1, label="peak reserved")
    ax.plot(times, [r.peak_allocated / GiB for r in records], color="0.3", lw=1, label="peak allocated")
    colours = plt.get_cmap("tab10")
    for i, phase in enumerate(PHASES):
        points = [r for r in records if r.phase == phase]
        if points:
            ax.scatter([r.time_s for r in points], [r.peak_allocated / GiB for r in points], s=10,
                       color=colours(i), label=phase, zorder=3)
    ax.set_xlabel("seconds since fit start")
    ax.set_ylabel("GiB")
    title = "memory per phase"
    if spikes:
        title += ": " + "; ".join(s.describe() for s in spikes[:2])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    try:
        with atomic_path(path, ext=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


class MemoryMonitor(L.Callback):
    """Peak allocated and reserved memory per step and per phase (data loading, vision forward, LLM
    forward, backward, optimizer step, validation, checkpoint save), written to `memory.csv` in the run
    folder (every `flush_every` steps and at the end) and drawn as `memory.png`; recurring spikes are
    printed with their phase and period. On CUDA it also records the allocator's history, which the
    out-of-memory report dumps as a snapshot."""

    def __init__(self, run_dir: str | Path | None = None, stats: MemoryStats | None = None,
                 flush_every: int = 50, record_history: bool = True, clock=time.monotonic):
        self.run_dir = Path(run_dir) if run_dir else None
        self.stats = stats
        self.flush_every = int(flush_every)
        self.record_history = record_history
        self.clock = clock
        self.records: list[PhaseRecord] = []
        self.phase = "data loading"
        self.spikes: list[Spike] = []
        self._start = 0.0
        self._step = 0
        self._hooks: list = []
        self.history_recording = False

    # -- phases -----------------------------------------------------------------------------------------
    def enter(self, phase: str) -> None:
        """Close the current phase (record its peaks) and start `phase`."""
        if self.stats is None:
            return
        self.records.append(PhaseRecord(self.clock() - self._start, self._step, self.phase,
                                        self.stats.max_allocated(), self.stats.max_reserved()))
        self.stats.reset_peak()
        self.phase = phase

    def _in_training(self, trainer) -> bool:
        return bool(getattr(trainer, "training", True))

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.stats is None:
            self.stats = CudaMemoryStats() if torch.cuda.is_available() and pl_module.device.type == "cuda" else None
        if self.stats is None:
            return
        if self.run_dir is None:
            self.run_dir = Path(trainer.default_root_dir)
        if self.record_history and isinstance(self.stats, CudaMemoryStats):
            try:
                torch.cuda.memory._record_memory_history(max_entries=100_000)
                self.history_recording = True
            except Exception as err:  # an allocator without history support: the report says so
                log.warning("memory history not recorded: %s", err)
        self._start = self.clock()
        self.stats.reset_peak()
        self._register_part_hooks(pl_module)

    def _register_part_hooks(self, pl_module) -> None:
        """Vision forward ends where the projector's last module returns; the LLM forward follows."""
        plan = getattr(pl_module, "plan", None)
        model = getattr(pl_module, "model", None)
        if plan is None or model is None:
            return
        modules = dict(unwrap(model).named_modules())
        vision = [modules[n] for n in plan.part_modules.get(Part.VISION, []) if n in modules]
        projector = [modules[n] for n in plan.part_modules.get(Part.PROJECTOR, []) if n in modules]
        if vision:
            self._hooks.append(vision[0].register_forward_pre_hook(lambda *_: self._vision_starts()))
        last = (projector or vision)[-1:] if (projector or vision) else []
        for module in last:
            self._hooks.append(module.register_forward_hook(
                lambda *_: self.enter("LLM forward") if self.phase == "vision forward" else None))

    _training = False

    def _vision_starts(self) -> None:
        # the training step's forward begins with the tower: what ran since the batch started is vision
        if self._training and self.phase == "LLM forward":
            self.phase = "vision forward"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._training = True
        self._step = trainer.global_step
        self.enter("LLM forward")  # closes data loading; the vision hooks split the forward

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.enter("backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self.enter("optimizer step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._training = False
        self.enter("data loading")
        if self.flush_every and trainer.global_step and trainer.global_step % self.flush_every == 0 \
                and trainer.is_global_zero and batch_idx % max(1, trainer.accumulate_grad_batches) == 0:
            self.flush()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._training = False
        self.enter("validation")
        self._step = trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        self.enter("data loading")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.enter("checkpoint save")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.stats is None:
            return
        self.enter("checkpoint save")  # the adapter is written at train end (AdapterSaver)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.stats is None:
            return
        self.enter("done")
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.history_recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.history_recording = False
        if trainer.is_global_zero:
            self.finish()

    def flush(self) -> None:
        if self.run_dir is not None and self.records:
            write_csv(self.records, self.run_dir / CSV_NAME)

    def finish(self) -> list[Spike]:
        """Write the CSV and the PNG; print recurring spikes."""
        self.flush()
        self.spikes = find_spikes(self.records)
        if self.run_dir is not None and self.records:
            plot_timeline(self.records, self.run_dir / PNG_NAME, self.spikes)
        peak = max((r.peak_allocated for r in self.records), default=0)
        worst = max(self.records, key=lambda r: r.peak_allocated, default=None)
        if worst is not None:
            print(f"vlm_finetune: memory: peak allocated {peak / GiB:.2f} GiB in {worst.phase} at step {worst.step}"
                  + "".join(f"\nvlm_finetune: memory spike {s.describe()}" for s in self.spikes), flush=True)
        return self.spikes
