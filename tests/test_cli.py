"""The command line: `python -m vlm_finetune data=conversations ...` trains on files; bad input fails fast and clearly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (235, 200, 20)}


def _run(args, cwd, cache, timeout=600):
    env = dict(os.environ, VLM_FINETUNE_CACHE=str(cache), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "vlm_finetune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _make_dataset(folder: Path, n: int) -> Path:
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        name = list(COLOURS)[i % 4]
        Image.new("RGB", (56, 56), COLOURS[name]).save(folder / "images" / f"{i}.png")
        if i % 2:
            records.append({"image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the picture?"}, {"from": "gpt", "value": name}]})
        else:
            records.append({"images": [f"{i}.png"], "messages": [
                {"role": "user", "content": "<image>What color is the picture?"}, {"role": "assistant", "content": name}]})
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


@pytest.mark.slow
def test_trains_on_a_conversation_file(tmp_path, _asset_cache):
    data = _make_dataset(tmp_path / "data", 48)
    run_dir = tmp_path / "run"
    result = _run(["data=conversations", f"data.path={data}", f"data.image_root={tmp_path / 'data' / 'images'}",
                   "trainer.max_steps=40", "data.micro_batch_size=8", "scheduler.warmup_steps=5",
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"], ROOT, _asset_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 40
    assert metrics["skipped_bad_records"] == 0
    # a colour read off a flat image is easy: the loss must fall well below chance (ln 400 ~ 6.0)
    assert metrics["val_loss"] < 1.0, metrics
    assert "val_accuracy" in result.stdout


@pytest.mark.slow  # whole CLI runs: the quick suite stays within 5 minutes
def test_corrupt_image_fails_fast_with_file_and_record(tmp_path, _asset_cache):
    data = _make_dataset(tmp_path / "data", 6)
    (tmp_path / "data" / "images" / "3.png").write_bytes(b"not a png at all")
    run_dir = tmp_path / "run"
    started = time.time()
    result = _run(["data=conversations", f"data.path={data}", f"data.image_root={tmp_path / 'data' / 'images'}",
                   f"hydra.run.dir={run_dir}"], ROOT, _asset_cache, timeout=120)
    assert result.returncode == 2
    assert f"{data}: record 3 image" in result.stderr and "3.png is corrupt" in result.stderr
    assert "data.on_bad_record=skip" in result.stderr
    assert time.time() - started < 60
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapter").exists()


@pytest.mark.slow  # a whole run from the command line: 8 s
def test_skip_mode_counts_bad_records(tmp_path, _asset_cache):
    data = _make_dataset(tmp_path / "data", 12)
    (tmp_path / "data" / "images" / "3.png").unlink()
    run_dir = tmp_path / "run"
    result = _run(["data=conversations", f"data.path={data}", f"data.image_root={tmp_path / 'data' / 'images'}",
                   "data.on_bad_record=skip", "trainer.max_steps=2", "data.micro_batch_size=2", "eval.generate=false",
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"], ROOT, _asset_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["skipped_bad_records"] == 1


@pytest.mark.slow  # command-line starts: 12 s
def test_a_plus_key_that_nothing_reads_stops_before_weights_load(tmp_path, _asset_cache):
    """`+data.pathh=...` (a misspelling added with '+') would be ignored silently: it is refused at once."""
    run_dir = tmp_path / "run"
    result = _run(["+data.pathh=/x/train.json", f"hydra.run.dir={run_dir}"], ROOT, _asset_cache, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "+data.pathh=/x/train.json adds a key that nothing reads" in result.stderr
    assert not run_dir.exists()  # the refused start left nothing behind
    # a '+' key something reads is accepted (the run stops later, at a check that needs the value)
    result = _run(["+model.config_overrides={}", "data.micro_batch_size=0", f"hydra.run.dir={run_dir}"], ROOT,
                  _asset_cache, timeout=120)
    assert result.returncode == 2 and "adds a key" not in result.stderr
    assert "data.micro_batch_size=0 must be a positive integer" in result.stderr
