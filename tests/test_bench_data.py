"""`python -m vlm_finetune.bench data`: padded, grouped and packed runs of the same samples, one table
(issue 15, point 6). The figures themselves are the benchmark's; here, that they are measured and consistent."""
from __future__ import annotations

import json

import pytest

from vlm_finetune.bench import cli as bench
from vlm_finetune.bench.data import SECTION, replace_section, summarise, write_conversations

SMALL = ["model.text.hidden_size=128", "model.text.intermediate_size=256", "model.text.num_hidden_layers=2"]


def test_the_conversation_file_mixes_lengths_and_text_only_samples(tmp_path):
    records = json.loads(write_conversations(tmp_path, 60).read_text())
    words = [len(r["conversations"][1]["value"].split()) for r in records]
    assert min(words) == 1 and max(words) > 100 and max(words) <= 300
    assert sum("image" not in r for r in records) == 20  # a third text-only


def test_summary_leaves_out_the_warm_up_step():
    steps = [{"supervised": 10, "padded": 0, "positions": 10, "rss_peak": 2**20, "seconds": 9.0},
             {"supervised": 30, "padded": 10, "positions": 40, "rss_peak": 3 * 2**20, "seconds": 1.0},
             {"supervised": 50, "padded": 30, "positions": 80, "rss_peak": 5 * 2**20, "seconds": 1.0}]
    s = summarise(steps)
    assert s["steps"] == 2 and s["supervised_tokens_per_s"] == 40.0 and s["padding_fraction"] == 40 / 120
    assert (s["rss_peak_mib_min"], s["rss_peak_mib_max"], s["positions_min"], s["positions_max"]) == (3, 5, 40, 80)


def test_the_section_is_replaced_and_the_rest_kept(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\n## GPU\n\nkeep me\n")
    replace_section(report, SECTION + "\n\nfirst\n")
    replace_section(report, SECTION + "\n\nsecond\n")
    text = report.read_text()
    assert "keep me" in text and "second" in text and "first" not in text and text.count(SECTION) == 1


@pytest.mark.slow
def test_one_invocation_measures_padded_and_packed_runs(tmp_path):
    report = tmp_path / "benchmarks.md"
    results = bench.main(["data", "--samples", "16", "--steps", "3", "--micro-batch", "4", "--modes",
                          "padded,packed", "--report", str(report), *SMALL])
    padded, packed = results["padded"], results["packed"]
    assert padded["steps"] == packed["steps"] == 2
    assert packed["positions_min"] % 512 == 0 and packed["positions_max"] % 512 == 0  # whole rows of 512
    assert packed["supervised_tokens_per_s"] > 0 and padded["supervised_tokens_per_s"] > 0
    assert packed["positions_max"] <= padded["positions_max"] or packed["padding_fraction"] < 1
    table = report.read_text()
    assert "| padded |" in table and "| packed |" in table and "python -m vlm_finetune.bench data" in table
