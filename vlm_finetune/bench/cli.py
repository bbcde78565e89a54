"""Side-by-side benchmark: this project's training step against the plain transformers + peft recipe
(`python -m vlm_finetune.bench suite` runs every GPU check instead: vlm_finetune/bench/suite.py; `... bench data`
compares padded, length-grouped and packed micro-batches on the CPU: vlm_finetune/bench/data.py; `... bench load`
measures the load's host and GPU memory beside the planner's load rows: vlm_finetune/bench/load_compare.py; `... bench
tables` the host memory of the same records as JSON and as Parquet: vlm_finetune/bench/table_memory.py; `... bench
recipes` times each tiny family's default recipe on the CPU: vlm_finetune/bench/recipes.py; `... bench fsdp` FSDP2 on
one GPU in bf16 and nf4 beside the plan: vlm_finetune/bench/fsdp_check.py).

    python -m vlm_finetune.bench model=glm41v_9b --seq 8192 --image 672 --baseline-liger 1 [hydra overrides]

Both run real training steps (forward, backward, AdamW step) of the same model size, sequence length
and image size, with random weights built from the config, in one invocation on one device: first the
baseline script (`shared/bench/glm4v_baseline.py`, in a subprocess), then ours. Peak allocated and
reserved GPU memory and tokens/s are printed side by side with their ratio and appended, with the
command, GPU and date, to docs/benchmarks.md. Without a GPU it runs the tiny model on the CPU (the
measured figures are then only tokens/s of a toy; GPU memory figures need a GPU).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from vlm_finetune.bench import data, recipes, suite, table_memory
from vlm_finetune.bench.measure import DEFAULT_BASELINE, ROOT, append_report, bench_ours, make_batch, run_baseline

__all__ = ["DEFAULT_BASELINE", "bench_ours", "main", "make_batch", "render", "run_baseline"]


def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def render(ours: dict, base: dict, command: str, device_name: str, date: str) -> str:
    rows = [("peak allocated GiB", "peak_alloc_gib", 2), ("peak reserved GiB", "peak_reserved_gib", 2),
            ("tokens/s", "tokens_per_s", 0), ("step s", "step_s", 3), ("trainable M params", "params_train_m", 2)]
    lines = [f"### {ours.get('model')} seq {ours.get('seq')} image {ours.get('image')}px ({date})", "",
             f"- command: `{command}`", f"- device: {device_name}",
             f"- ours: precision={ours.get('precision')}, loss.impl={ours.get('loss_impl')} "
             f"(chunk {ours.get('chunk_size')}), liger_kernels={ours.get('liger_kernels')}, "
             f"checkpointing={ours.get('checkpointing')}" + (f", error {ours['err']}" if ours.get("err") else ""),
             f"- baseline: {base.get('case')}" + (f", error {base['err']}" if base.get("err") else ""), "",
             "| figure | vlm_finetune | baseline | ratio (ours / baseline) |", "|---|---|---|---|"]
    for label, key, digits in rows:
        a, b = ours.get(key), base.get(key)
        ratio = f"{a / b:.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
        lines.append(f"| {label} | {_fmt(a, digits)} | {_fmt(b, digits)} | {ratio} |")
    if device_name.startswith("CPU"):
        lines += ["", "CPU run of the tiny model: GPU memory and real-size throughput need a GPU."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> tuple[dict, dict] | int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["suite"]:  # every GPU check in one command (vlm_finetune/bench/suite.py)
        return suite.main(argv[1:])
    if argv[:1] == ["load"]:  # the load's memory beside the planner's load rows (vlm_finetune/bench/load_compare.py)
        return suite.load_main(argv[1:])
    if argv[:1] == ["fsdp"]:  # FSDP2 on one GPU beside the plan, bf16 and nf4 (vlm_finetune/bench/fsdp_check.py)
        return suite.fsdp_main(argv[1:])
    if argv[:1] == ["tables"]:  # host memory of JSON and Parquet records (vlm_finetune/bench/table_memory.py)
        return table_memory.main(argv[1:])
    if argv[:1] == ["recipes"]:  # each tiny family's default recipe, timed (vlm_finetune/bench/recipes.py)
        return recipes.main(argv[1:])
    if argv[:1] == ["data"]:  # padded, length-grouped and packed micro-batches on the CPU (vlm_finetune/bench/data.py)
        return data.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m vlm_finetune.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--image", type=int, default=672)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--baseline-liger", type=int, default=1,
                        help="compare with the baseline's Liger recipe (1) or plain (0)")
    parser.add_argument("--baseline-script", type=Path, default=DEFAULT_BASELINE)
    parser.add_argument("--baseline-args", default="", help="extra flags for the baseline script, e.g. '--gc 0'")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args, overrides = parser.parse_known_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("vlm_finetune.bench: no GPU here: running the tiny model on the CPU; GPU memory and real-size "
              "throughput figures need a GPU.", flush=True)
        overrides = [o for o in overrides if not o.startswith("model=")] + ["model=tiny_glm41v"]
        args.baseline_liger = 0  # Liger's kernels are Triton: GPU only
    else:
        # our GPU recipe: bf16 frozen base, float32 LoRA master weights, bf16 autocast; LoRA only, as the baseline
        overrides = ["precision=bf16-mixed", "train.projector=frozen", *overrides]
    base = {"case": "baseline", "err": "skipped"} if args.no_baseline else run_baseline(
        args.baseline_script, args.seq, args.image, args.steps, device, args.baseline_liger,
        shlex.split(args.baseline_args))
    if device == "cuda":
        torch.cuda.empty_cache()
    ours = bench_ours(overrides, args.seq, args.image, args.steps, device)
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    command = "python -m vlm_finetune.bench " + " ".join(shlex.quote(a) for a in argv)
    text = render(ours, base, command, device_name, dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    print(json.dumps({"ours": ours, "baseline": base}), flush=True)
    print(text, flush=True)
    append_report(args.report, text)
    return ours, base

