"""Lightning callbacks that a config can add under `callbacks:` (each entry has a `_target_`), and the run's
training progress bar (StepProgressBar)."""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from vlm_finetune.data.sample import IGNORE_INDEX
from vlm_finetune.io import atomic_path
from vlm_finetune.running_strategy import full_gradients, is_accumulation_boundary


class GradientSnapshot(L.Callback):
    """Saves the gradients of every trainable parameter just before optimizer step `step` to a safetensors
    file, written by rank 0 (DDP gradients are already averaged there; ZeRO's are assembled from every
    rank's partition). For checking that two ways of splitting a batch give the same gradients, and for
    debugging exploding updates."""

    def __init__(self, path: str, step: int = 0):
        self.path = Path(path)
        self.step = int(step)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step != self.step or not is_accumulation_boundary(trainer.strategy):
            return
        grads = full_gradients(trainer.strategy, pl_module)  # every rank takes part (ZeRO's partitions)
        if not trainer.is_global_zero:
            return
        from safetensors.torch import save_file

        with atomic_path(self.path) as tmp:
            save_file(grads, str(tmp))


class StepProgressBar(TQDMProgressBar):
    """The training bar of a run: it counts optimizer steps out of `trainer.max_steps` (Lightning's own bar
    counts the batches of an epoch, and a run bounded by steps reads "Epoch 2/-2"), starts at the step a
    resumed run continues from, and shows for the last step the supervised tokens per second (labels that
    take a loss, over every rank) and the padding fraction (padded positions / all positions of the step's
    micro-batches, over every rank). `steps` keeps those figures, one dict per optimizer step."""

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.steps: list[dict] = []
        self._counts = [0, 0, 0]  # supervised tokens, padded positions, positions of this step so far
        self._started: float | None = None
        self._seen_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._seen_step = int(trainer.global_step)
        self._counts, self._started = [0, 0, 0], None
        self._show_steps(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        self._show_steps(trainer)  # one bar for the whole run, not one per epoch

    def _show_steps(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else None
        bar.initial = 0
        bar.n = int(trainer.global_step)
        bar.set_description("Step")
        if not bar.disable:
            bar.refresh()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if isinstance(batch, dict) and not batch.get("empty") and "labels" in batch:
            labels = batch["labels"]
            mask = batch.get("padding_mask", batch.get("attention_mask"))  # packed rows: no attention mask
            self._counts[0] += int((labels != IGNORE_INDEX).sum())
            self._counts[1] += int((mask == 0).sum()) if mask is not None else 0
            self._counts[2] += int(labels.numel())
        if int(trainer.global_step) == self._seen_step:
            return  # inside an optimizer step (accumulation)
        now = time.perf_counter()
        counts = torch.tensor(self._counts, dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1:  # every rank reaches this boundary, so the sum is a collective in step
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        tokens, padded, positions = (int(v) for v in counts.tolist())
        seconds = now - (self._started if self._started is not None else now)
        self.steps.append({"step": int(trainer.global_step), "supervised_tokens": tokens, "padded": padded,
                           "positions": positions, "seconds": seconds,
                           "tokens_per_second": tokens / seconds if seconds > 0 else float("nan"),
                           "padding_fraction": padded / positions if positions else 0.0})
        self._counts, self._started, self._seen_step = [0, 0, 0], now, int(trainer.global_step)
        bar = self.train_progress_bar
        if bar is not None and self.is_enabled:
            bar.n = int(trainer.global_step)
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._started = None  # the next step's time starts at its first batch, not before the validation

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if self.steps:
            last = self.steps[-1]
            items["tok/s"] = f"{last['tokens_per_second']:.1f}"
            items["pad"] = f"{last['padding_fraction']:.3f}"
        return items
