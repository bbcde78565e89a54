"""Every run measures its own load (memory/load_measured.py): the host growth from the run's start to the peak when
training starts, or None where an earlier peak of the process hides it, never a guess."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import gc, json, sys, torch
from types import SimpleNamespace
from vlm_finetune.memory.load_measured import LoadMemory
if sys.argv[1] == "hidden":  # a peak before the run: 512 MiB touched, then freed
    big = torch.ones(128 * 2**20)
    del big
    gc.collect()
meter = LoadMemory()
model = torch.ones(64 * 2**20)  # 256 MiB, touched: what a load leaves resident
meter.on_fit_start(SimpleNamespace(is_global_zero=True), SimpleNamespace(device=torch.device("cpu")))
print("RESULT " + json.dumps(meter.metrics()))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "vlm_finetune: load (rank 0): host" in out.stdout
    return json.loads(out.stdout.split("RESULT ")[-1])


def test_the_load_growth_is_measured_from_the_run_start():
    metrics = _probe("plain")
    assert 0.24 <= metrics["load_host_growth_gib"] <= 0.30  # the 0.25 GiB tensor and a little of the process
    assert "load_gpu_peak_gib" not in metrics  # a CPU run: not measured, left out


@pytest.mark.slow  # a run in a fresh process; the growth test stays quick
def test_an_earlier_peak_makes_the_figure_none_not_a_guess():
    assert "load_host_growth_gib" not in _probe("hidden")
