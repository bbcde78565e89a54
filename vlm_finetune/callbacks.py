"""Lightning callbacks that a config can add under `callbacks:` (each entry has a `_target_`)."""
from __future__ import annotations

from pathlib import Path

import lightning as L

from vlm_finetune.io import atomic_path
from vlm_finetune.strategies import full_gradients, is_accumulation_boundary


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
