"""Measured training steps, ours and the baseline recipe's, for the benchmark and the GPU suite: `bench_ours`
runs this project's step (forward, backward, AdamW) on one device and reports peak memory and tokens/s;
`run_baseline` runs `shared/bench/glm4v_baseline.py` in a subprocess; `append_report` adds a dated entry to
docs/benchmarks.md."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vlm_finetune.autotune import resolve_activation_checkpointing, synthetic_batch
from vlm_finetune.config import compose, read_settings
from vlm_finetune.io import write_atomic
from vlm_finetune.models.registry import get_family, parse_trainability
from vlm_finetune.module import batch_loss_sum, step_contexts
from vlm_finetune.precision import weights_policy
from vlm_finetune.settings import is_auto
from vlm_finetune.trainability import build_trainable_model, compile_regions, count_parameters, set_frozen_eval, unwrap

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_BASELINE = ROOT.parent / "shared" / "bench" / "glm4v_baseline.py"


def make_batch(processor, seq: int, image_px: int, vocab_limit: int) -> dict:
    """One sample of exactly `seq` tokens: a prompt with one image, then a supervised reply of random token
    ids filling the rest (as the baseline's batch: everything after the image is supervised)."""
    return synthetic_batch(processor, 1, seq, image_px, vocab_limit)


def bench_ours(overrides: list[str], seq: int, image_px: int, steps: int, device: str) -> dict:
    cfg = compose(overrides, output_dir="/tmp/vlm_finetune_bench")
    settings = read_settings(cfg)
    family = get_family(settings.model.family)
    processor = family.load_processor(settings.model, truncation=settings.data.truncation)
    policy = weights_policy(settings.precision)
    dtype, mixed = policy.load_dtype, policy.mixed
    loss_settings = settings.loss
    started = time.time()
    checkpointing, scope = settings.model.activation_checkpointing, settings.speed.checkpoint_scope
    if is_auto(checkpointing):  # as train() does: the plan with the least recompute that fits
        checkpointing, scope = resolve_activation_checkpointing(settings, overrides)
    model, plan = build_trainable_model(family, settings.model, parse_trainability(settings.trainability),
                                        settings.lora, policy, checkpointed_layers=checkpointing,
                                        checkpoint_scope=scope, device=device)
    if settings.speed.compile:
        compile_regions(model, family)
    model = model.to(device)
    model.train()
    set_frozen_eval(model, plan)
    autocast = torch.autocast(device, dtype=dtype, enabled=mixed)
    backends = settings.speed.attention_backends

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
            with autocast, step_contexts(bool(cfg.speed.offload_activations), backends, device == "cuda"):
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
              "loss_impl": cfg.loss.impl, "chunk_size": cfg.loss.chunk_size, "precision": settings.precision,
              "liger_kernels": bool(cfg.model.liger_kernels),
              "checkpointing": checkpointing, "build_s": round(build_s, 1),
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


def run_python(code: str, args: list[str], timeout: float) -> tuple[int, str, str]:
    """`python -c code args` from the repository root, with it on the path: (exit code, stdout, stderr); -1 and a
    message when it runs past `timeout` seconds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return -1, "", f"timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout, proc.stderr


def result_line(stdout: str) -> dict | None:
    """The JSON of a child's last `RESULT {...}` line, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1].removeprefix("RESULT ")) if lines else None


def append_report(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Benchmarks\n\nEach entry: the command that produced it, the device and the date. "
              "Written by `python -m vlm_finetune.bench`.\n\n")
    old = path.read_text() if path.exists() else header
    write_atomic(path, old.rstrip("\n") + "\n\n" + text)


