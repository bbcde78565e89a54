"""Side-by-side benchmark: this project's training step against the plain transformers + peft recipe.

    python -m vlm_finetune.bench model=glm4v_9b --seq 8192 --image 672 --baseline-liger 1 [hydra overrides]

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
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vlm_finetune.autotune import synthetic_batch
from vlm_finetune.config import LossSettings, compose
from vlm_finetune.io import write_atomic
from vlm_finetune.models import get_family, parse_trainability
from vlm_finetune.module import batch_loss_sum
from vlm_finetune.precision import weights_policy
from vlm_finetune.trainability import build_trainable_model, count_parameters, set_frozen_eval, unwrap

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = ROOT.parent / "shared" / "bench" / "glm4v_baseline.py"


def make_batch(processor, seq: int, image_px: int, vocab_limit: int) -> dict:
    """One sample of exactly `seq` tokens: a prompt with one image, then a supervised reply of random token
    ids filling the rest (as the baseline's batch: everything after the image is supervised)."""
    return synthetic_batch(processor, 1, seq, image_px, vocab_limit)


def bench_ours(overrides: list[str], seq: int, image_px: int, steps: int, device: str) -> dict:
    cfg = compose(overrides, output_dir="/tmp/vlm_finetune_bench")
    family = get_family(cfg.model.family)
    processor = family.load_processor(cfg.model)
    policy = weights_policy(cfg.precision.name)
    dtype, mixed = policy.load_dtype, policy.mixed
    loss_settings = LossSettings.from_config(cfg.loss)
    started = time.time()
    model, plan = build_trainable_model(family, cfg.model, parse_trainability(cfg.train), cfg.lora, policy,
                                        checkpointed_layers=cfg.model.activation_checkpointing, device=device)
    model = model.to(device)
    model.train()
    set_frozen_eval(model, plan)
    autocast = torch.autocast(device, dtype=dtype, enabled=mixed)
    build_s = time.time() - started
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = int(family.output_embedding(unwrap(model)).weight.shape[0])
    batch = make_batch(processor, seq, image_px, min(vocab, 150000))
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
    times, error, loss = [], None, float("nan")
    try:
        for _ in range(steps):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast:
                loss_sum, count = batch_loss_sum(family, model, batch, loss_settings)
            (loss_sum / max(count, 1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            loss = float(loss_sum.detach()) / max(count, 1)
    except torch.OutOfMemoryError:
        error = "OOM"
    result = {"case": "vlm_finetune", "model": cfg.model.name, "seq": seq, "image": image_px,
              "params_total_b": round(total / 1e9, 3), "params_train_m": round(trainable / 1e6, 2),
              "loss_impl": cfg.loss.impl, "chunk_size": cfg.loss.chunk_size, "precision": cfg.precision.name,
              "liger_kernels": bool(cfg.model.get("liger_kernels")),
              "checkpointing": bool(cfg.model.get("activation_checkpointing")), "build_s": round(build_s, 1),
              "err": error}
    if device == "cuda":
        result.update(weights_gib=round(weights / 2**30, 2),
                      peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    if times and not error:
        timed = times[2:] or times
        result.update(step_s=round(statistics.median(timed), 3), tokens_per_s=round(seq / statistics.median(timed), 1),
                      loss=round(loss, 4))
    return result


def run_baseline(script: Path, seq: int, image_px: int, steps: int, device: str, liger: int, extra: list[str]) -> dict:
    if not script.is_file():
        return {"case": "baseline", "err": f"baseline script not found at {script} (pass --baseline-script)"}
    size = "real" if device == "cuda" else "tiny"
    # the baseline draws its random token ids unseeded; seed them so a run can be repeated (at tiny size an
    # unlucky draw can also hit the image-token id and make the baseline fail)
    runner = ("import runpy, sys, torch; torch.manual_seed(0); sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable, "-c", runner, str(script), "--size", size, "--seq", str(seq), "--image", str(image_px),
           "--steps", str(steps), "--device", device, "--liger", str(liger), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"case": "baseline", "err": f"exit {proc.returncode}: {proc.stderr[-800:]}"}
    result = json.loads(lines[-1])
    result["case"] = "baseline" + (" (liger)" if liger else " (plain)")
    return result


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


def append_report(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Benchmarks\n\nEach entry: the command that produced it, the device and the date. "
              "Written by `python -m vlm_finetune.bench`.\n\n")
    old = path.read_text() if path.exists() else header
    write_atomic(path, old.rstrip("\n") + "\n\n" + text)


def main(argv: list[str] | None = None) -> tuple[dict, dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
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
        overrides = [o for o in overrides if not o.startswith("model=")] + ["model=tiny_glm4v"]
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


if __name__ == "__main__":
    main()
