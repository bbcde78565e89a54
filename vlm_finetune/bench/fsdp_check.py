"""FSDP2 on one GPU beside the plan (a check of the GPU suite, vlm_finetune/bench/suite.py; alone:
`python -m vlm_finetune.bench fsdp`).

GLM-4.1V-9B cut to four decoder layers (the dry run: tiny_glm41v on the CPU) trains a few steps through the CLI
under `trainer=fsdp` at world size 1, once in bf16 and once in nf4 (the 4-bit codes sharded as floating-point
storage, models/four_bit_storage.py), each in its own process. A callback of this check (`StepPeak`) records the
longest micro-batch the steps saw and the allocator's peak over the training steps; the planner plans the same
command at that length and the synthetic images' size, and its peak stands beside the measured one with their ratio
(ok within 15 %)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import lightning as L
import torch

from vlm_finetune.bench.load_compare import _child

GiB = 2**30
TOLERANCE = 0.15
RUN = ["trainer.max_steps=4", "data.num_train=16", "data.num_val=2", "data.micro_batch_size=1",
       "data.val_batch_size=1", "eval.generate=false", "trainer.val_every_n_steps=null",
       "trainer.enable_progress_bar=false", "memory.monitor=false", "hardware.devices=1"]


def model_overrides(dry_run: bool, layers: int = 4) -> list[str]:
    """GLM-4.1V-9B with `layers` decoder layers (its ViT and embeddings whole), or the tiny GLM-4.1V."""
    if dry_run:
        return ["model=tiny_glm41v", "hardware=cpu"]
    return ["model=glm41v_9b", f"model.config_overrides={{text: {{num_hidden_layers: {layers}}}}}", "hardware=auto"]


class StepPeak(L.Callback):
    """Writes `path` (JSON) when training ends: the longest training micro-batch in tokens, its images' side, and
    on a GPU the allocator's peak over the training steps (reset when training starts: the load is not in it)."""

    def __init__(self, path: str):
        self.path, self.seq, self.image_px = path, 0, 0

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seq = max(self.seq, int(batch["input_ids"].shape[-1]))

    def on_train_end(self, trainer, pl_module) -> None:
        peak = torch.cuda.max_memory_allocated() / GiB if torch.cuda.is_available() else None
        Path(self.path).write_text(json.dumps({"seq": self.seq, "peak_alloc_gib": peak}))


def check(dry_run: bool, work_dir: Path, timeout: float, layers: int = 4) -> list[dict]:
    """The rows (check, case, status, figures, note, seconds): one per precision."""
    from vlm_finetune.config import compose
    from vlm_finetune.plan import plan_memory

    source = model_overrides(dry_run, layers)
    rows = []
    for precision in ("bf16-mixed", "nf4"):
        begun = time.time()
        case = f"{'tiny_glm41v' if dry_run else f'glm41v_9b {layers} layers'} fsdp ws1 {precision}"
        run_dir = Path(work_dir) / precision
        shutil.rmtree(run_dir, ignore_errors=True)  # this check's own run of an earlier suite: run it again
        overrides = [*source, "trainer=fsdp", f"precision={precision}", *RUN]
        probe = run_dir / "step_peak.json"
        result, err = _child("import runpy, sys; sys.argv = ['vlm_finetune', *sys.argv[1:]]; "
                             "runpy.run_module('vlm_finetune', run_name='__main__')",
                             [*overrides, f"hydra.run.dir={run_dir}",
                              "+callbacks.step_peak._target_=vlm_finetune.bench.fsdp_check.StepPeak",
                              f"+callbacks.step_peak.path={probe}"], timeout)
        if result is None or not probe.is_file():
            rows.append(dict(check="fsdp", case=case, status="failed", figures={}, note=err or "no step_peak.json",
                             seconds=time.time() - begun))
            continue
        measured = json.loads(probe.read_text())
        image_px = int(compose(overrides).data.get("image_size") or 0) or None
        plan = plan_memory(overrides, seq=measured["seq"], image_px=image_px)
        planned = round(plan.allocated_bytes / GiB, 2)
        figures = {"seq": measured["seq"], "image_px": image_px, "plan_gib": planned,
                   "measured_gib": None if measured["peak_alloc_gib"] is None else round(measured["peak_alloc_gib"], 2)}
        if figures["measured_gib"]:
            figures["plan_over_measured"] = round(planned / figures["measured_gib"], 3)
            ok = abs(figures["plan_over_measured"] - 1) <= TOLERANCE
            note = f"planner {'within' if ok else 'NOT within'} {TOLERANCE:.0%} of the measured peak"
        else:
            ok, note = True, "CPU dry run: FSDP2 at world size 1 trained; no allocator peak on the CPU"
        rows.append(dict(check="fsdp", case=case, status="ok" if ok else "failed", figures=figures, note=note,
                         seconds=time.time() - begun))
    return rows
