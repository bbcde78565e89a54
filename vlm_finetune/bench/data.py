"""The data side on the CPU: padded, length-grouped and packed micro-batches of the same samples.

    python -m vlm_finetune.bench data [--samples 96] [--steps 12] [--micro-batch 8] [hydra overrides]

Writes a conversation file with answers of 1 to 300 words (log-uniform: many short, some long) in which
a third of the samples are text-only, then trains the same tiny model on it once per mode, each in a
process of its own (so that one mode's memory does not carry into the next):

- padded: micro-batches as drawn, each padded to its longest sample;
- grouped: `data.group_by_length=true` (micro-batches of similar length);
- packed: `data.packing=true` (the micro-batch's samples share rows of `data.max_length` tokens).

Per mode it reports supervised tokens per second, the padding fraction, the spread of step times, the
positions each micro-batch computes (rows x width: what activation memory scales with) and the peak
resident memory of each step (sampled every 5 ms), from step 2 on (step 1 warms up). The table goes into
docs/benchmarks.md under its own heading (replaced on each run; other sections kept). Each run uses one CPU
thread (`hardware.cpu_threads=N` after the options changes it), so that step times stay steady on a shared CPU.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
from PIL import Image

from vlm_finetune.data.sample import IGNORE_INDEX
from vlm_finetune.io import write_atomic

ROOT = Path(__file__).resolve().parent.parent.parent
SECTION = "## Data-side benchmark on the CPU"
# a tiny GLM-4.1V made wide enough that a step's time follows the positions it computes (at the default tiny
# size a step is mostly fixed overhead); data.max_length is the row length when packed
MODEL = ["model.text.hidden_size=512", "model.text.intermediate_size=1536", "model.text.num_hidden_layers=4",
         "model.text.num_attention_heads=8", "model.text.num_key_value_heads=4", "data.max_length=512"]
MODES = {"padded": [], "grouped": ["data.group_by_length=true"], "packed": ["data.packing=true"]}
WORDS = "red green blue yellow circle square triangle diamond one two three four left right top bottom".split()


def write_conversations(folder: Path, samples: int, seed: int = 0) -> Path:
    """`samples` conversations: answers of 1 to 300 words, log-uniform; every third one text-only."""
    rng = random.Random(seed)
    records = []
    for i in range(samples):
        words = min(300, max(1, int(math.exp(rng.uniform(0.0, math.log(300))))))
        answer = " ".join(rng.choice(WORDS) for _ in range(words))
        if i % 3 == 2:
            records.append({"conversations": [{"from": "human", "value": f"Describe item {i} in words."},
                                              {"from": "gpt", "value": answer}]})
            continue
        Image.new("RGB", (56, 56), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(
            folder / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nDescribe picture {i}."}, {"from": "gpt", "value": answer}]})
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    (folder / "val.json").write_text(json.dumps(records[:2]))
    return path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class StepStats(L.Callback):
    """Per optimizer step: seconds, supervised tokens, padded and total positions, and the peak resident
    memory (a thread samples /proc every 5 ms); written as JSON to `out` when training ends."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.steps: list[dict] = []
        self._current = {"supervised": 0, "padded": 0, "positions": 0, "rss_peak": 0}
        self._started = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._current["rss_peak"] = max(self._current["rss_peak"], _rss_bytes())

    def on_train_start(self, trainer, pl_module) -> None:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "labels" in batch:
            labels = batch["labels"]
            mask = batch.get("padding_mask", batch.get("attention_mask"))
            self._current["supervised"] += int((labels[:, 1:] != IGNORE_INDEX).sum())
            self._current["padded"] += int((mask == 0).sum()) if mask is not None else 0
            self._current["positions"] += int(labels.numel())
        if not batch.get("last_in_step", True):
            return
        now = time.perf_counter()
        self.steps.append(dict(self._current, step=int(trainer.global_step), seconds=now - self._started))
        self._current = {"supervised": 0, "padded": 0, "positions": 0, "rss_peak": _rss_bytes()}
        self._started = now

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop.set()
        write_atomic(self.out, json.dumps(self.steps))


def summarise(steps: list[dict]) -> dict:
    """The mode's figures from step 2 on."""
    timed = steps[1:] if len(steps) > 1 else steps
    seconds = sum(s["seconds"] for s in timed)
    times = sorted(s["seconds"] for s in timed)
    peaks = [s["rss_peak"] / 2**20 for s in timed]
    positions = [s["positions"] for s in timed]
    return {"steps": len(timed), "supervised_tokens_per_s": sum(s["supervised"] for s in timed) / seconds,
            "padding_fraction": sum(s["padded"] for s in timed) / max(1, sum(positions)),
            "step_s_p50": times[len(times) // 2], "step_s_max": times[-1], "step_s_min": times[0],
            "positions_min": min(positions), "positions_max": max(positions),
            "rss_peak_mib_min": min(peaks), "rss_peak_mib_max": max(peaks)}


def run_mode(mode: str, data: Path, work: Path, steps: int, micro: int, overrides: list[str]) -> dict:
    stats = work / f"{mode}.json"
    args = ["data=conversations", f"data.path={data}", f"data.val_path={data.parent / 'val.json'}",
            *MODEL, f"data.micro_batch_size={micro}", f"trainer.max_steps={steps}",
            "trainer.val_every_n_steps=null", "eval.generate=false", "trainer.enable_progress_bar=false",
            "checkpoint.every_n_steps=null", "hardware.cpu_threads=1", *MODES[mode], *overrides,
            "+callbacks.databench._target_=vlm_finetune.bench.data.StepStats", f"+callbacks.databench.out={stats}",
            f"hydra.run.dir={work / mode}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "vlm_finetune", *args], capture_output=True, text=True, env=env,
                          cwd=work, timeout=3600)
    if proc.returncode != 0 or not stats.exists():
        raise RuntimeError(f"mode {mode} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return summarise(json.loads(stats.read_text()))


def render(results: dict, command: str, date: str, samples: int, micro: int) -> str:
    padded = results.get("padded", {}).get("supervised_tokens_per_s")
    lines = [SECTION, "", f"- command: `{command}`", f"- hardware: CPU ({os.cpu_count()} cores); date {date}",
             f"- model: tiny_glm41v widened ({' '.join(MODEL[:-1])}), LoRA, float32",
             f"- data: {samples} conversations, answers 1-300 words (log-uniform), a third text-only; micro-batch "
             f"{micro} samples; packed rows of data.max_length=512 tokens; figures from step 2 on", "",
             "| mode | supervised tokens/s | vs padded | padding fraction | step s p50 (min-max) | positions per "
             "step (min-max) | peak RSS per step MiB (min-max) |", "|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['supervised_tokens_per_s']:,.0f} | {_ratio(r, padded)} | "
                     f"{r['padding_fraction']:.3f} | "
                     f"{r['step_s_p50']:.2f} ({r['step_s_min']:.2f}-{r['step_s_max']:.2f}) | "
                     f"{r['positions_min']:,}-{r['positions_max']:,} | "
                     f"{r['rss_peak_mib_min']:,.0f}-{r['rss_peak_mib_max']:,.0f} |")
    return "\n".join(lines) + "\n"


def _ratio(result: dict, padded: float | None) -> str:
    return f"{result['supervised_tokens_per_s'] / padded:.2f}x" if padded else "-"


def replace_section(path: Path, text: str, section: str = SECTION) -> None:
    """`text` (which starts with `section`, a "## " heading) replaces that section of `path`, or is appended."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(section)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(section))
        new = old[:start] + text + (old[end:] if end >= 0 else "")
    write_atomic(path, new)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m vlm_finetune.bench data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--modes", default="padded,grouped,packed")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args, overrides = parser.parse_known_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {','.join(MODES)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="vlm_databench_") as tmp:
        work = Path(tmp)
        data = write_conversations(work, args.samples)
        for mode in modes:
            print(f"vlm_finetune.bench data: {mode} ...", flush=True)
            results[mode] = run_mode(mode, data, work, args.steps, args.micro_batch, overrides)
    command = "python -m vlm_finetune.bench data " + " ".join(shlex.quote(a) for a in argv)
    text = render(results, command, dt.datetime.now().strftime("%Y-%m-%d %H:%M"), args.samples, args.micro_batch)
    print(json.dumps(results), flush=True)
    print(text, flush=True)
    replace_section(args.report, text)
    return results
