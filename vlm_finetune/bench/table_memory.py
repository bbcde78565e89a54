"""Host memory of the data side: the same records as JSON and as Parquet with embedded images (issue 31).

    python -m vlm_finetune.bench tables [--records 200000] [--report docs/benchmarks.md]

Writes N conversations (a third text-only, the rest with one small PNG: 1,000 distinct 24x24 images, by path
in the JSON file, embedded as bytes in the Parquet file), then, in a fresh process per form, does what a run
does with its data before the first step: opens and checks every record (build_datasets, data.on_bad_record
=error, a held-out fraction of 0.01), takes the length proxies of data.group_by_length and draws the first
micro-batch (8 samples, images decoded). It reports the process's resident size growth over the process after
its imports (current and peak, from /proc/self/status), and the seconds taken. Parquet's one-time conversion
into the datasets cache (an Arrow file, then memory-mapped) and the record check run in a short-lived process
of their own, which ends before the figures are taken (the seconds include it). The model's
load is left out: it is the same for both forms. The table goes to docs/benchmarks.md under its own heading.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlm_finetune.bench.data import replace_section

ROOT = Path(__file__).resolve().parent.parent.parent
SECTION = "## Host memory of JSON and Parquet records (bench tables)"
DISTINCT_IMAGES = 1000
MICRO_BATCH = 8


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_forms(folder: Path, records: int) -> tuple[Path, Path]:
    """train.json (image paths) and train.parquet (the same images embedded) of `records` conversations."""
    import datasets
    from PIL import Image

    (folder / "images").mkdir(exist_ok=True)
    pngs = []
    for k in range(DISTINCT_IMAGES):
        buffer = io.BytesIO()
        Image.new("RGB", (24, 24), (k % 256, (7 * k) % 256, (13 * k) % 256)).save(buffer, format="PNG")
        (folder / "images" / f"{k}.png").write_bytes(buffer.getvalue())
        pngs.append(buffer.getvalue())
    json_records, rows = [], []
    for i in range(records):
        answer = f"item {i} is number {i % 97} of its kind"
        if i % 3 == 2:
            messages = [{"role": "user", "content": f"Say something about item {i}."},
                        {"role": "assistant", "content": answer}]
            json_records.append({"images": [], "messages": messages})
            rows.append({"images": [], "messages": messages})
            continue
        messages = [{"role": "user", "content": f"<image>What is shown in picture {i}?"},
                    {"role": "assistant", "content": answer}]
        json_records.append({"images": [f"images/{i % DISTINCT_IMAGES}.png"], "messages": messages})
        rows.append({"images": [{"bytes": pngs[i % DISTINCT_IMAGES], "path": None}], "messages": messages})
    (folder / "train.json").write_text(json.dumps(json_records))
    del json_records
    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "messages": datasets.List({"role": datasets.Value("string"),
                                                             "content": datasets.Value("string")})})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "train.parquet"))
    return folder / "train.json", folder / "train.parquet"


def measure(path: str, image_root: str) -> dict:
    """In this process: open and check the records, take the length proxies, draw the first micro-batch."""
    import datasets  # noqa: F401 - imported before the baseline, as a run has it imported

    from vlm_finetune.data.datamodule import build_datasets
    from vlm_finetune.data.grouping import LengthGroupedSampler, sample_lengths
    from vlm_finetune.settings import DataSettings

    settings = DataSettings(source="conversations", micro_batch_size=MICRO_BATCH, batch_per_device=None,
                            val_batch_size=None, max_length=None, truncation="truncate", on_bad_record="error",
                            group_by_length=True, num_workers=0, packing=False, pack_length=None,
                            global_batch_size=None, num_train=None, num_val=None, image_size=None, path=path,
                            val_path=None, val_fraction=0.01, image_root=image_root)
    before = {field: _status_kib(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    started = time.perf_counter()
    train, val, _ = build_datasets(settings, seed=0)
    sampler = LengthGroupedSampler(sample_lengths(train), MICRO_BATCH, seed=0)
    first = [train[i] for _, i in zip(range(MICRO_BATCH), iter(sampler))]
    seconds = time.perf_counter() - started
    return {"records": len(train) + len(val), "images_in_first_batch": sum(len(s.images) for s in first),
            "rss_growth_mib": (_status_kib("VmRSS") - before["VmRSS"]) / 1024,
            "anon_growth_mib": (_status_kib("RssAnon") - before["RssAnon"]) / 1024,
            "file_growth_mib": (_status_kib("RssFile") - before["RssFile"]) / 1024,
            "peak_rss_mib": _status_kib("VmHWM") / 1024, "rss_before_mib": before["VmRSS"] / 1024, "seconds": seconds}


def render(results: dict, command: str, date: str, records: int) -> str:
    json_growth = results["json"]["rss_growth_mib"]
    lines = [SECTION, "", f"- command: `{command}`", f"- hardware: CPU ({os.cpu_count()} cores, shared with other "
             f"jobs while it ran); date {date}",
             f"- data: {records:,} conversations, a third text-only, the rest one 24x24 PNG ({DISTINCT_IMAGES:,} "
             "distinct; by path in JSON, embedded bytes in Parquet); held-out fraction 0.01",
             "- measured: resident size growth of a fresh process over its state after imports, through opening "
             "and checking every record, the length proxies and the first micro-batch of 8 (the model's load, the "
             "same for both, left out); Parquet's one-time conversion into the datasets cache and the "
             "record check run in a short-lived process of their own (vlm_finetune/data/sources.py), not counted here",
             "- resident = anonymous (the process's own memory: Python objects, buffers) + file-backed (pages of "
             "mapped files, here the memory-mapped Arrow file: page cache the kernel can drop and that data "
             "workers share); /proc/self/status RssAnon and RssFile",
             "- the run's process maps the Arrow files without reading them and reads only the record batches that "
             "hold drawn rows (vlm_finetune/data/arrow_rows.py; opening them through datasets read every batch's "
             "header, which made the whole file resident); the length-grouped order is held in numpy arrays", "",
             "| form | resident growth MiB | vs JSON | anonymous growth MiB | vs JSON | file-backed growth MiB | "
             "peak resident MiB (process) | seconds |", "|---|---|---|---|---|---|---|---|"]
    json_anon = results["json"]["anon_growth_mib"]
    for form, result in results.items():
        ratio = result["rss_growth_mib"] / json_growth if json_growth > 0 else float("nan")
        anon = result["anon_growth_mib"] / json_anon if json_anon > 0 else float("nan")
        lines.append(f"| {form} | {result['rss_growth_mib']:,.1f} | {ratio:.3f}x | {result['anon_growth_mib']:,.1f} | "
                     f"{anon:.3f}x | {result['file_growth_mib']:,.1f} | {result['peak_rss_mib']:,.1f} | "
                     f"{result['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m vlm_finetune.bench tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "IMAGE_ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the child process: one form
        print(json.dumps(measure(*args.measure)))
        return {}
    results = {}
    with tempfile.TemporaryDirectory(prefix="vlm_bench_tables_") as work:
        folder = Path(work)
        json_path, parquet_path = write_forms(folder, args.records)
        env = dict(os.environ, HF_DATASETS_CACHE=str(folder / "cache"))
        for form, path in (("json", json_path), ("parquet", parquet_path)):
            done = subprocess.run([sys.executable, "-m", "vlm_finetune.bench", "tables", "--measure", str(path),
                                   str(folder)], capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"measuring {form} failed:\n{done.stderr[-3000:]}")
            results[form] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{form}: {results[form]}", flush=True)
    command = "python -m vlm_finetune.bench tables " + shlex.join(argv)
    text = render(results, command.strip(), dt.datetime.now().strftime("%Y-%m-%d %H:%M"), args.records)
    print(text)
    replace_section(args.report, text, SECTION)
    return results
