"""The benchmark's CPU path: both recipes run real steps, the report is appended with its command."""
from __future__ import annotations

import pytest
import torch

from vlm_finetune.bench import cli as bench
from vlm_finetune.config import model_settings


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
@pytest.mark.skipif(not bench.DEFAULT_BASELINE.is_file(),
                    reason=f"the baseline script is not at {bench.DEFAULT_BASELINE} (shared/ beside the checkout)")
@pytest.mark.slow  # the baseline recipe and ours, each in its own process: 8 s
def test_cpu_bench_runs_both_and_appends_report(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\nearlier entry\n")
    ours, base = bench.main(["--seq", "96", "--image", "56", "--steps", "3", "--report", str(report)])
    assert ours["err"] is None and ours["tokens_per_s"] > 0 and ours["params_train_m"] > 0, ours
    assert ours["model"] == "tiny_glm41v" and ours["loss_impl"] == "chunked"
    assert base.get("err") is None, base
    assert base["tokens_per_s"] > 0 and base["seq"] == 96
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nearlier entry")  # appended, not overwritten
    assert "python -m vlm_finetune.bench --seq 96 --image 56 --steps 3" in text
    assert "CPU" in text and "GPU memory and real-size throughput need a GPU" in text
    assert "| tokens/s |" in text


def test_make_batch_has_exact_length_and_supervision(tmp_path):
    from conftest import compose_cfg
    from vlm_finetune.models.registry import get_family

    cfg = compose_cfg([], tmp_path)
    processor = get_family("glm4v").load_processor(model_settings(cfg.model), "truncate")
    batch = bench.make_batch(processor, 300, 112, 390)
    assert batch["input_ids"].shape == (1, 300)
    n_image = int((batch["input_ids"] == processor.image_token_id).sum())
    assert n_image == 16  # 112 px -> 8 x 8 patches -> 16 merged tokens
    supervised = int((batch["labels"] != -100).sum())
    assert 300 - supervised < n_image + 20  # all but the prompt and the image are supervised


def test_bench_load_appends_its_table_and_fails_on_a_failed_row(tmp_path, monkeypatch):
    """`python -m vlm_finetune.bench load`: the load check's rows (run for real by the suite's dry run, slow) as a
    dated table under its own title, exit 1 when a row failed."""
    from vlm_finetune.bench import load_compare

    rows = [dict(check="load", case="zero3, world size 1", status="ok", note="n", seconds=1.0,
                 figures={"host_gib": 7.85, "plan_host_gib": 6.05, "host_plan_over_measured": 0.771}),
            dict(check="load", case="nf4, single", status="failed", figures={}, note="exit 1", seconds=1.0)]
    seen = []
    monkeypatch.setattr(load_compare, "check", lambda dry_run, work_dir, timeout: seen.append(dry_run) or rows)
    report = tmp_path / "benchmarks.md"
    assert bench.main(["load", "--dry-run", "--report", str(report), "--work-dir", str(tmp_path / "w")]) == 1
    text = report.read_text()
    assert seen == [True] and "Load memory beside the planner" in text
    assert "python -m vlm_finetune.bench load --dry-run" in text
    assert "| load | zero3, world size 1 | ok | host_gib=7.85, plan_host_gib=6.05, host_plan_over_measured=0.771 |" in text
    assert "| load | nf4, single | failed |" in text
