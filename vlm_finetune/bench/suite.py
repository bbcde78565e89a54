"""`python -m vlm_finetune.bench suite [--dry-run] [--report docs/benchmarks.md]`: every GPU check of the project
in one command, for the rare minutes a GPU is at hand.

- side by side: the baseline recipe (`shared/bench/glm4v_baseline.py`, plain and with Liger) and this project's
  step for the workloads of the performance goals (GLM-4.1V-9B size, LoRA r=16, frozen ViT, one image);
- the planner against the measured peak of each of those runs;
- strategy round trips: tiny GLM-4V and tiny MGM / MGM-MoE train under single / fsdp / zero2 / zero3 /
  zero3_offload and their adapter reloads with PEFT;
- the memory monitor's CSV and PNG of one run;
- the load: MGM-8x7B cut to two layers, read from a released-layout folder under ZeRO-3 at world size 1 and in
  nf4, host and GPU memory at the load beside the planner's load rows (vlm_finetune/bench/load_compare.py; alone:
  `python -m vlm_finetune.bench load`);
- FSDP2 on one GPU: GLM-4.1V-9B cut to four layers under trainer=fsdp in bf16 and in nf4, the steps' peak beside
  the plan's (vlm_finetune/bench/fsdp_check.py; alone: `python -m vlm_finetune.bench fsdp`).

Each check runs in its own process with its own time limit; a failure is a row, and the suite goes on. It
appends one dated table to the report, writes the rows as JSON beside it and prints a one-screen summary.
`--dry-run` runs the same plan on the tiny model on the CPU (what CI runs, in under two minutes): its
figures are no GPU result.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlm_finetune.bench import fsdp_check, load_compare
from vlm_finetune.bench.measure import DEFAULT_BASELINE, append_report, result_line, run_baseline, run_python
from vlm_finetune.io import write_atomic
from vlm_finetune.plan import plan_memory

ROOT = Path(__file__).resolve().parent.parent.parent
GiB = 2**30
# the recipe the goals are stated for (bench/cli.py main adds the first two on a GPU)
GPU_BASE = ["precision=bf16-mixed", "train.projector=frozen", "model=glm41v_9b", "data.micro_batch_size=1",
            "hardware=auto", "model.liger_kernels=true"]


@dataclass
class Workload:
    name: str
    seq: int
    image: int
    overrides: list[str]
    goal: str = ""


@dataclass
class Row:
    check: str
    case: str
    status: str  # ok | failed | skipped
    figures: dict = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0


def workloads(dry_run: bool) -> list[Workload]:
    if dry_run:  # the same plan, tiny: 96 tokens, a 56 px image
        tiny = ["model=tiny_glm41v", "hardware=cpu"]
        return [Workload("lean", 96, 56, [*tiny, "model.activation_checkpointing=true"]),
                Workload("fast", 96, 56, [*tiny, "model.activation_checkpointing=false"]),
                Workload("vit-trained", 96, 112, [*tiny, "model.activation_checkpointing=true", "train.vision=full"]),
                Workload("selective", 96, 56, [*tiny, "model.activation_checkpointing=true",
                                               "speed.checkpoint_scope=mlp"])]
    return [
        Workload("8k memory-lean", 8192, 672, [*GPU_BASE, "model.activation_checkpointing=true", "loss.impl=liger"],
                 "<= 22.5 GiB, >= 9,000 tok/s"),
        Workload("8k auto (fastest that fits)", 8192, 672, [*GPU_BASE, "model.activation_checkpointing=auto"],
                 ">= 10,000 tok/s"),
        Workload("2k fastest", 2048, 672, [*GPU_BASE, "model.activation_checkpointing=false"], ">= 10,000 tok/s"),
        Workload("8k no checkpointing", 8192, 672, [*GPU_BASE, "model.activation_checkpointing=false"]),
        Workload("4k ViT trained 1344 px", 4096, 1344, [*GPU_BASE, "model.activation_checkpointing=true",
                                                        "train.vision=full", "model.max_image_size=1344"],
                 "<= 24 GiB, >= 5,000 tok/s"),
        Workload("2k all checkpointed", 2048, 672, [*GPU_BASE, "model.activation_checkpointing=true"]),
        # speed options (the planner models whole-layer and selective checkpointing, not offloading: its row
        # for the offloaded run says how far that is from what it holds)
        Workload("8k selective (MLP) checkpointing", 8192, 672, [*GPU_BASE, "model.activation_checkpointing=true",
                                                                 "speed.checkpoint_scope=mlp"]),
        Workload("8k activations offloaded", 8192, 672, [*GPU_BASE, "model.activation_checkpointing=true",
                                                         "speed.offload_activations=true"], "<= 22.5 GiB"),
        Workload("8k regional compile", 8192, 672, [*GPU_BASE, "model.activation_checkpointing=true",
                                                    "speed.compile=true"], ">= 9,000 tok/s"),
    ]


def measure_ours(work: Workload, device: str, steps: int, timeout: float) -> Row:
    code = ("import json, sys; from vlm_finetune.bench.measure import bench_ours; "
            "print('RESULT ' + json.dumps(bench_ours("
            "json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))")
    started = time.time()
    rc, out, err = run_python(code, [json.dumps(work.overrides), str(work.seq), str(work.image), str(steps), device],
                           timeout)
    result = result_line(out)
    if rc != 0 or result is None or result.get("err"):
        reason = (result or {}).get("err") or err.strip().splitlines()[-1:] or [f"exit {rc}"]
        return Row("side by side", f"ours: {work.name}", "failed", note=str(reason)[:200],
                   seconds=time.time() - started)
    figures = {k: result.get(k) for k in ("peak_alloc_gib", "peak_reserved_gib", "tokens_per_s", "step_s", "loss")}
    return Row("side by side", f"ours: {work.name}", "ok", figures, work.goal, time.time() - started)


def measure_baseline(liger: bool, work: Workload, device: str, steps: int, timeout: float) -> Row:
    name = f"baseline {'liger' if liger else 'plain'}: {work.seq} tokens"
    if liger and device != "cuda":
        return Row("side by side", name, "skipped", note="Liger's kernels need a GPU")
    started = time.time()
    try:
        result = run_baseline(DEFAULT_BASELINE, work.seq, work.image, steps, device, int(liger), [])
    except subprocess.TimeoutExpired:
        result = {"err": "timed out"}
    if result.get("err"):
        return Row("side by side", name, "failed", note=str(result["err"])[-200:], seconds=time.time() - started)
    figures = {k: result.get(k) for k in ("peak_alloc_gib", "peak_reserved_gib", "tokens_per_s", "step_s")}
    return Row("side by side", name, "ok", figures, seconds=time.time() - started)


def planner_row(work: Workload, measured: Row) -> Row:
    """The planner's predicted peak for the workload against what its run measured."""
    started = time.time()
    try:
        plan = plan_memory(work.overrides, seq=work.seq, image_px=work.image)
    except Exception as err:  # a failure is a row
        return Row("planner", work.name, "failed", note=f"{type(err).__name__}: {err}"[:200])
    predicted = round(plan.allocated_bytes / GiB, 2)
    peak = measured.figures.get("peak_alloc_gib") if measured.status == "ok" else None
    figures = {"predicted_gib": predicted, "measured_gib": peak}
    if peak:
        error = (predicted - peak) / peak
        figures["error"] = round(error, 3)
        status, note = ("ok" if abs(error) <= 0.10 else "failed"), "goal: within 10%"
    else:
        status, note = "skipped", "no measured GPU peak (CPU dry run or the run failed)"
    return Row("planner", work.name, status, figures, note, time.time() - started)


def strategy_runs(dry_run: bool) -> list[tuple[str, list[str]]]:
    if dry_run:
        return [("tiny_glm41v single", ["model=tiny_glm41v", "trainer=single", "hardware=cpu"])]
    runs = [(f"tiny_glm41v {t}", ["model=tiny_glm41v", f"trainer={t}"])
            for t in ("single", "fsdp", "zero2", "zero3", "zero3_offload")]
    return runs + [("tiny_mgm fsdp", ["model=tiny_mgm", "trainer=fsdp"]),
                   ("tiny_mgm_moe zero3", ["model=tiny_mgm_moe", "trainer=zero3"])]


def round_trip(case: str, overrides: list[str], run_dir: Path, dry_run: bool, timeout: float) -> Row:
    """Train a few steps, then reload the adapter with PEFT in a fresh process: the reloaded B matrices equal
    the file and at least one is trained away from zero."""
    steps = 2 if dry_run else 10
    args = [*overrides, f"trainer.max_steps={steps}", "data.num_train=64", "data.num_val=8", "data.micro_batch_size=4",
            "trainer.enable_progress_bar=false", "trainer.val_every_n_steps=null", "eval.max_new_tokens=2",
            f"hydra.run.dir={run_dir}"]
    if not dry_run:
        args += ["hardware=auto", "hardware.devices=1", "precision=bf16-mixed", "memory.monitor=true"]
    started = time.time()
    rc, _, err = run_python("import runpy, sys; sys.argv = ['vlm_finetune', *sys.argv[1:]]; "
                         "runpy.run_module('vlm_finetune', run_name='__main__')", args, timeout)
    if rc != 0:
        return Row("round trip", case, "failed", note=(err.strip().splitlines() or [f"exit {rc}"])[-1][:200],
                   seconds=time.time() - started)
    check = ("import json, sys, torch; from pathlib import Path; from omegaconf import OmegaConf; "
             "from safetensors.torch import load_file; from vlm_finetune.adapters import load_adapter; "
             "from vlm_finetune.models.registry import get_family; run = Path(sys.argv[1]); "
             "from vlm_finetune.config import model_settings; "
             "spec = model_settings(OmegaConf.load(run / 'config.yaml').model); family = get_family(spec.family); "
             "model = load_adapter(family.build_model(spec, torch.float32), run / 'adapter'); "
             "saved = load_file(str(run / 'adapter' / 'adapter_model.safetensors')); "
             "params = {n.replace('.default', ''): p for n, p in model.named_parameters() if 'lora_B' in n}; "
             "same = all(torch.equal(params[k].float().cpu(), v.float()) for k, v in saved.items() if k in params); "
             "trained = max(float(v.abs().max()) for k, v in saved.items() if 'lora_B' in k); "
             "print('RESULT ' + json.dumps({'reloaded_equal': same, 'max_lora_b': trained, "
             "'tensors': len(saved)}))")
    rc, out, err = run_python(check, [str(run_dir)], timeout)
    result = result_line(out)
    if rc != 0 or result is None:
        return Row("round trip", case, "failed", note=(err.strip().splitlines() or ["no result"])[-1][:200],
                   seconds=time.time() - started)
    ok = result["reloaded_equal"] and result["max_lora_b"] > 0
    return Row("round trip", case, "ok" if ok else "failed", result, seconds=time.time() - started)


def monitor_row(run_dir: Path, dry_run: bool) -> Row:
    if dry_run:
        return Row("monitor", "memory.csv / memory.png", "skipped", note="CUDA allocator statistics need a GPU")
    files = {name: (run_dir / name).is_file() for name in ("memory.csv", "memory.png")}
    return Row("monitor", "memory.csv / memory.png", "ok" if all(files.values()) else "failed", files,
               str(run_dir))


def render(rows: list[Row], command: str, device_name: str, date: str, dry_run: bool, title: str = "GPU suite"
           ) -> str:
    lines = [f"### {title} ({date}){' - CPU dry run, no GPU figures' if dry_run else ''}", "",
             f"- command: `{command}`", f"- device: {device_name}", "",
             "| check | case | status | figures | note |", "|---|---|---|---|---|"]
    for row in rows:
        figures = ", ".join(f"{k}={v}" for k, v in row.figures.items() if v is not None)
        lines.append(f"| {row.check} | {row.case} | {row.status} | {figures} | {row.note} |")
    return "\n".join(lines) + "\n"


def run_suite(dry_run: bool, report: Path, work_dir: Path, budget_s: float) -> list[Row]:
    import torch

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    steps = 3 if dry_run else 5
    started = time.time()
    rows: list[Row] = []

    def remaining(share: float) -> float:
        return max(30.0, min(share, budget_s - (time.time() - started)))

    plan = workloads(dry_run)
    rows.append(measure_baseline(False, plan[0], device, steps, remaining(240)))
    rows.append(measure_baseline(True, plan[0], device, steps, remaining(240)))
    measured = []
    for work in plan:
        measured.append(measure_ours(work, device, steps, remaining(300)))
        rows.append(measured[-1])
    rows += [planner_row(work, row) for work, row in zip(plan, measured)]
    first_run = None
    for case, overrides in strategy_runs(dry_run):
        run_dir = work_dir / case.replace(" ", "_")
        first_run = first_run or run_dir
        rows.append(round_trip(case, overrides, run_dir, dry_run, remaining(240)))
    rows.append(monitor_row(first_run, dry_run))
    if dry_run or budget_s - (time.time() - started) >= LOAD_CHECK_S:
        rows += load_rows(dry_run, work_dir / "load", remaining(LOAD_CHECK_S))
    else:
        rows.append(Row("load", "MGM-8x7B cut to 2 layers", "skipped",
                        note="too little of the suite's budget left: python -m vlm_finetune.bench load"))
    if dry_run or budget_s - (time.time() - started) >= FSDP_CHECK_S:
        rows += [Row(**row) for row in fsdp_check.check(dry_run, work_dir / "fsdp", remaining(FSDP_CHECK_S))]
    else:
        rows.append(Row("fsdp", "GLM-4.1V-9B cut to 4 layers", "skipped",
                        note="too little of the suite's budget left: python -m vlm_finetune.bench fsdp"))
    write_rows(rows, report, "python -m vlm_finetune.bench suite" + (" --dry-run" if dry_run else ""), device,
               dry_run)
    return rows


FSDP_CHECK_S = 240.0  # the FSDP2 check (vlm_finetune/bench/fsdp_check.py): two short runs of a 3 B model
LOAD_CHECK_S = 240.0  # the load check (vlm_finetune/bench/load_compare.py): a 7 GB folder written, two one-step runs


def load_rows(dry_run: bool, work_dir: Path, timeout: float) -> list[Row]:
    return [Row(**row) for row in load_compare.check(dry_run, work_dir, timeout)]


def write_rows(rows: list[Row], report: Path, command: str, device: str, dry_run: bool, title: str = "GPU suite"
               ) -> None:
    """Append the rows' dated table to the report and write them as JSON beside it."""
    import torch

    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    append_report(report, render(rows, command, device_name, date, dry_run, title))
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_atomic(report.with_name(f"suite-{stamp}.json"), json.dumps(
        {"command": command, "device": device_name, "date": date, "dry_run": dry_run,
         "rows": [row.__dict__ for row in rows]}, indent=2) + "\n")


def load_main(argv: list[str]) -> int:
    """`python -m vlm_finetune.bench load [--dry-run]`: the suite's load check alone
    (vlm_finetune/bench/load_compare.py)."""
    return _check_main("load", load_compare, "the tiny MoE on the CPU", "Load memory beside the planner",
                       "each of its three processes", argv)


def fsdp_main(argv: list[str]) -> int:
    """`python -m vlm_finetune.bench fsdp [--dry-run]`: the suite's FSDP2 check alone
    (vlm_finetune/bench/fsdp_check.py)."""
    return _check_main("fsdp", fsdp_check, "tiny_glm41v on the CPU", "FSDP2 on one GPU beside the planner",
                       "each of its two runs", argv)


def _check_main(command: str, module, dry_run_help: str, title: str, processes: str, argv: list[str]) -> int:
    """One check of the suite alone (`module.check(dry_run, work_dir, timeout)`), its table appended to the report."""
    import torch

    parser = _parser(command, module.__doc__, dry_run_help, f"/tmp/vlm_finetune_{command}")
    parser.add_argument("--timeout", type=float, default=300.0, help=f"seconds for {processes}")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    rows = [Row(**row) for row in module.check(args.dry_run, args.work_dir, args.timeout)]
    write_rows(rows, args.report, f"python -m vlm_finetune.bench {command}" + (" --dry-run" if args.dry_run else ""),
               device, args.dry_run, title)
    return _finish(rows)


def summary(rows: list[Row]) -> str:
    counts = {s: sum(1 for r in rows if r.status == s) for s in ("ok", "failed", "skipped")}
    lines = [f"vlm_finetune suite: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"]
    for row in rows:
        figures = ", ".join(f"{k}={v}" for k, v in list(row.figures.items())[:4] if v is not None)
        lines.append(f"  {row.status:<7} {row.check:<12} {row.case[:34]:<34} {figures[:60]}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = _parser("suite", __doc__, "the same plan on the tiny model, on the CPU", "/tmp/vlm_finetune_suite")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole suite (default 8 min)")
    args = parser.parse_args(argv)
    return _finish(run_suite(args.dry_run, args.report, args.work_dir, args.budget))


def _parser(command: str, doc: str, dry_run_help: str, work_dir: str) -> argparse.ArgumentParser:
    """`python -m vlm_finetune.bench <command>`'s options: --dry-run, --report, --work-dir."""
    parser = argparse.ArgumentParser(prog=f"python -m vlm_finetune.bench {command}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--work-dir", type=Path, default=Path(work_dir))
    return parser


def _finish(rows: list[Row]) -> int:
    """Print the summary; the exit code is 1 when a check failed."""
    print(summary(rows), flush=True)
    return 1 if any(r.status == "failed" for r in rows) else 0
