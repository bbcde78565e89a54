"""The GPU suite's plan runs on the CPU (`--dry-run`, tiny model): every check gives its row, the report gets a
dated table with the command and a JSON beside it, and a failing check is a row, not the end of the suite."""
from __future__ import annotations

import json

import pytest

from vlm_finetune.bench import cli as bench
from vlm_finetune.bench import suite

pytestmark = pytest.mark.slow


def test_dry_run_gives_every_row_and_writes_the_report(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\nearlier entry\n")
    status = bench.main(["suite", "--dry-run", "--report", str(report), "--work-dir", str(tmp_path / "work")])
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nearlier entry")  # appended
    assert "python -m vlm_finetune.bench suite --dry-run" in text and "CPU dry run, no GPU figures" in text
    rows = json.loads(next(tmp_path.glob("suite-*.json")).read_text())["rows"]
    checks = {(r["check"], r["status"]) for r in rows}
    assert {("side by side", "ok"), ("planner", "skipped"), ("round trip", "ok"), ("monitor", "skipped")} <= checks
    ours = [r for r in rows if r["case"].startswith("ours:")]
    assert len(ours) == 4 and all(r["status"] == "ok" and r["figures"]["tokens_per_s"] > 0 for r in ours)
    trip = next(r for r in rows if r["check"] == "round trip")
    assert trip["figures"]["reloaded_equal"] is True and trip["figures"]["max_lora_b"] > 0
    assert all(r["figures"]["predicted_gib"] > 0 for r in rows if r["check"] == "planner")
    # the load check: the tiny MoE written as a released folder, loaded under zero3 (world size 1) and in nf4
    load = {r["case"]: r for r in rows if r["check"] == "load"}
    assert set(load) == {"zero3, world size 1", "nf4, single"}
    assert all(r["status"] == "ok" and r["figures"]["host_gib"] > 0 and "plan_host_gib" in r["figures"]
               for r in load.values())
    assert (tmp_path / "work" / "load" / "folder" / "model.safetensors.index.json").is_file()
    # FSDP2 at world size 1 in bf16 and nf4 (on a GPU: GLM-4.1V-9B cut to 4 layers, its peak beside the plan's)
    fsdp = {r["case"]: r for r in rows if r["check"] == "fsdp"}
    assert set(fsdp) == {"tiny_glm41v fsdp ws1 bf16-mixed", "tiny_glm41v fsdp ws1 nf4"}
    assert all(r["status"] == "ok" and r["figures"]["seq"] > 0 and r["figures"]["plan_gib"] >= 0
               and r["figures"]["measured_gib"] is None for r in fsdp.values())
    assert status == 0


def test_a_failing_check_is_a_row(tmp_path):
    row = suite.measure_ours(suite.Workload("broken", 96, 56, ["model=no_such_model"]), "cpu", 2, 120)
    assert row.status == "failed" and row.case == "ours: broken" and row.note
