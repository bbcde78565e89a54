"""The load's memory, measured beside the planner's load rows (a check of the GPU suite, vlm_finetune/bench/suite.py).

A real-size MoE cut to a few decoder layers (MGM-8x7B: Mixtral's 4096-wide layers of 8 experts, CLIP-L and
ConvNeXt-L; the dry run: tiny_mgm_moe) is written once as a released-layout folder with random bf16 weights
(the family's writer), then trained for one step from that folder twice, each in its own process:

- `trainer=zero3` at world size 1: built inside zero.Init, the folder streamed one tensor at a time;
- `precision=nf4 trainer=single`: each decoder layer quantised as it is read (models/nf4_load.py).

Each run records its own load (memory/load_measured.py: the host growth from the run's start to the peak when
training starts, the model loaded and the strategy set up, and the GPU's peak allocated bytes then). The
planner plans the same command (`plan_memory`, the folder's config) and its host and GPU load rows stand
beside the measured figures, with their ratio (ok within 25 %)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from vlm_finetune.bench.measure import result_line, run_python

GiB = 2**30
TOLERANCE = 0.25
RUN = ["trainer.max_steps=1", "data.max_length=1024", "data.num_train=8", "data.num_val=2", "data.micro_batch_size=1",
       "data.val_batch_size=1", "eval.generate=false", "trainer.val_every_n_steps=null",
       "trainer.enable_progress_bar=false", "memory.monitor=false"]


def model_overrides(dry_run: bool, layers: int = 2) -> list[str]:
    """The model the folder is written from: MGM-8x7B cut to `layers` decoder layers, or the tiny MoE."""
    return ["model=tiny_mgm_moe"] if dry_run else ["model=mgm_8x7b", f"model.llm.num_hidden_layers={layers}"]


def cases(dry_run: bool) -> list[tuple[str, list[str]]]:
    where = ["hardware=cpu"] if dry_run else ["hardware=auto"]
    return [("zero3, world size 1", [*where, "hardware.devices=1", "trainer=zero3", "precision=bf16-mixed"]),
            ("nf4, single", [*where, "hardware.devices=1", "trainer=single", "precision=nf4",
                             "lora.llm_modules=attention"])]


def write_folder(overrides: list[str], folder: Path) -> None:
    """The model of `overrides` built from its config with random weights (on the GPU where there is one), written
    in bf16 in the family's released layout with its tokenizer: what `model.path` loads."""
    import torch

    from vlm_finetune.config import compose, read_settings
    from vlm_finetune.models.mgm import checkpoint
    from vlm_finetune.models.registry import get_family

    settings = read_settings(compose(overrides))
    family = get_family(settings.model.family)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = family.build_model(settings.model, dtype=torch.bfloat16, device=device)
    checkpoint.save_folder(model, folder, dtype=torch.bfloat16)
    family.load_processor(settings.model, truncation=settings.data.truncation).save_pretrained(str(folder))


def _child(code: str, args: list[str], timeout: float) -> tuple[dict | None, str]:
    """(its RESULT line's JSON, or {}; "") when the child ends well, else (None, why)."""
    rc, out, err = run_python(code, args, timeout)
    if rc != 0:
        return None, (err.strip().splitlines() or [f"exit {rc}"])[-1][:200]
    return result_line(out) or {}, ""


def _ratio(planned: float, measured: float | None) -> float | None:
    return round(planned / measured, 3) if measured else None


def check(dry_run: bool, work_dir: Path, timeout: float, layers: int = 2) -> list[dict]:
    """The rows (check, case, status, figures, note, seconds) of the load check: the folder, then each case."""
    from vlm_finetune.plan import plan_memory

    started = time.time()
    folder = Path(work_dir) / "folder"
    source = model_overrides(dry_run, layers)
    if not (folder / "config.json").is_file():
        result, err = _child("import json, sys; from pathlib import Path; from vlm_finetune.bench.load_compare import "
                             "write_folder; write_folder(json.loads(sys.argv[1]), Path(sys.argv[2])); "
                             "print('RESULT {}')", [json.dumps(source), str(folder)], timeout)
        if result is None:
            return [dict(check="load", case="write the folder", status="failed", figures={}, note=err,
                         seconds=time.time() - started)]
    rows = []
    for case, extra in cases(dry_run):
        begun = time.time()
        overrides = [source[0], f"model.path={folder}", *extra, *RUN]
        run_dir = Path(work_dir) / case.replace(" ", "_").replace(",", "")
        shutil.rmtree(run_dir, ignore_errors=True)  # this check's own run of an earlier suite: run it again
        # the run measures its own load (memory/load_measured.py) and writes it to metrics.json
        result, err = _child("import runpy, sys; sys.argv = ['vlm_finetune', *sys.argv[1:]]; "
                             "runpy.run_module('vlm_finetune', run_name='__main__')",
                             [*overrides, f"hydra.run.dir={run_dir}"], timeout)
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
        if result is None or not metrics:
            rows.append(dict(check="load", case=case, status="failed", figures={}, note=err,
                             seconds=time.time() - begun))
            continue
        load = plan_memory(overrides).load
        host = metrics.get("load_host_growth_gib")
        figures = {"host_gib": host, "plan_host_gib": round(load.bytes_per_rank / GiB, 2),
                   "host_plan_over_measured": _ratio(load.bytes_per_rank / GiB, host)}
        if metrics.get("load_gpu_peak_gib") is not None:
            gpu = metrics["load_gpu_peak_gib"]
            figures.update(gpu_load_gib=gpu, plan_gpu_load_gib=round(load.gpu_bytes_per_rank / GiB, 2),
                           gpu_plan_over_measured=_ratio(load.gpu_bytes_per_rank / GiB, gpu))
        ratios = [v for k, v in figures.items() if k.endswith("plan_over_measured") and v is not None]
        if dry_run:  # a model of a few MB: the process's own growth (data, trainer) is most of what is measured
            ok, note = True, "CPU dry run: the load ran; a tiny model is no test of the planner"
        else:
            ok = bool(ratios) and all(abs(r - 1) <= TOLERANCE for r in ratios)
            note = f"planner {'within' if ok else 'NOT within'} {TOLERANCE:.0%} of the measured load"
        rows.append(dict(check="load", case=case, status="ok" if ok else "failed", figures=figures, note=note,
                         seconds=time.time() - begun))
    return rows
