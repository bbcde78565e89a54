"""The load's memory, measured in every run: what the planner's two load rows predict (host memory per rank, GPU
memory per rank at the load), read when training starts, the model built or read and the strategy set up.

- host: the process's peak resident size when training starts (VmHWM) minus its resident size when the run began,
  before any weight existed (VmRSS). A peak reached before the run (an earlier run in the same process) hides the
  load's: the figure is then None, not a guess.
- GPU: the allocator's peak on this rank's device when training starts (since the run began where CUDA was already
  in use by this process; else since the process began, which is the same thing).

The figures go to metrics.json (`load_host_growth_gib`, `load_gpu_peak_gib`, rank 0's; one not measured is left
out) and are printed when training starts."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

GiB = 2**30


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # not Linux


class LoadMemory(L.Callback):
    """Made before the model is built; reads the load's host growth and GPU peak when training starts."""

    def __init__(self) -> None:
        self.rss_before, self.peak_before = _status("VmRSS"), _status("VmHWM")
        self.host_growth: int | None = None
        self.gpu_peak: int | None = None
        # only a context that already exists is touched (a rank's first CUDA call belongs on its own device)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = _status("VmHWM")
        if peak is not None and self.rss_before is not None and self.peak_before is not None and \
                peak > self.peak_before:
            self.host_growth = peak - self.rss_before
        device = pl_module.device
        if device.type == "cuda":
            self.gpu_peak = int(torch.cuda.max_memory_allocated(device))
        if trainer.is_global_zero:
            host = "not measured (an earlier peak of this process hides it)" if self.host_growth is None \
                else f"+{self.host_growth / GiB:.2f} GiB"
            gpu = "" if self.gpu_peak is None else f", GPU peak {self.gpu_peak / GiB:.2f} GiB"
            print(f"vlm_finetune: load (rank 0): host {host}{gpu}", flush=True)

    def metrics(self) -> dict:
        """The figures measured (metrics.json holds numbers only: one not measured is left out)."""
        figures = {"load_host_growth_gib": self.host_growth, "load_gpu_peak_gib": self.gpu_peak}
        return {k: round(v / GiB, 4) for k, v in figures.items() if v is not None}
