"""Lightning callbacks that a config can add under `callbacks:` (each entry has a `_target_`)."""
from __future__ import annotations

from pathlib import Path

import lightning as L


class GradientSnapshot(L.Callback):
    """Saves the gradients of every trainable parameter just before optimizer step `step` to a safetensors
    file, written by rank 0 (DDP gradients are already averaged there; ZeRO's are assembled from every
    rank's partition). For checking that two ways of splitting a batch give the same gradients, and for
    debugging exploding updates."""

    def __init__(self, path: str, step: int = 0):
        self.path = Path(path)
        self.step = int(step)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step != self.step:
            return
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # Lightning calls this after every micro-batch under DeepSpeed (its engine accumulates)
            if not trainer.strategy.model.is_gradient_accumulation_boundary():
                return
            # ZeRO keeps reduced gradients in its partitions: every rank takes part in assembling each one
            from deepspeed.utils import safe_get_full_grad

            grads = {}
            for name, p in pl_module.named_parameters():
                if p.requires_grad:
                    grad = safe_get_full_grad(p)
                    if grad is not None:
                        grads[name] = grad.detach().float().cpu().contiguous()
        else:
            grads = {name: p.grad.detach().float().cpu().contiguous()
                     for name, p in pl_module.named_parameters() if p.requires_grad and p.grad is not None}
        if not trainer.is_global_zero:
            return
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file(grads, str(tmp))
        tmp.replace(self.path)
