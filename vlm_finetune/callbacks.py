"""Lightning callbacks that a config can add under `callbacks:` (each entry has a `_target_`)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class GradientSnapshot(L.Callback):
    """Saves the gradients of every trainable parameter just before optimizer step `step` to a
    safetensors file (rank 0 only; DDP gradients are already averaged there). For checking that two
    ways of splitting a batch give the same gradients, and for debugging exploding updates."""

    def __init__(self, path: str, step: int = 0):
        self.path = Path(path)
        self.step = int(step)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step != self.step or not trainer.is_global_zero:
            return
        from safetensors.torch import save_file

        grads = {name: p.grad.detach().float().cpu().contiguous()
                 for name, p in pl_module.named_parameters() if p.requires_grad and p.grad is not None}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file(grads, str(tmp))
        tmp.replace(self.path)
