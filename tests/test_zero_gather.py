"""ZeRO-3's gather in the plan and the run (issue 35): DeepSpeed's coalesced all-gather holds a gathered module
twice for a moment (its flat buffer, and each parameter's copy made from it); `trainer.stage3_allgather_sequential`
gathers each parameter into its own buffer (held once; DeepSpeed's prefetch bucket is then 1 element, so one
parameter is prefetched). Its `auto` is true only where the plan fits
with it and not without. The bytes themselves are checked against a census on CPU ranks in test_phase_peaks.py."""
from __future__ import annotations

import pytest

from conftest import compose_cfg
from vlm_finetune.config import read_settings, strategy_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.memory.planner import plan_run
from vlm_finetune.memory.report import GiB
from vlm_finetune.plan import plan_with_suggestions
from vlm_finetune.strategies import ZeroSizes, deepspeed_config

MGM_8X7B_6X4090 = ["model=mgm_8x7b", "trainer=zero3", "hardware=6x4090", "precision=bf16-mixed",
                   "data.micro_batch_size=1"]
KEY = "trainer.stage3_allgather_sequential"


def _gathered(plan) -> dict[str, int]:
    return {row.item: row.bytes for row in plan.rows if row.item.startswith("ZeRO-3 gathered module")
            or row.item.startswith("ZeRO-3 prefetch")}


def test_the_coalesced_gather_holds_the_module_twice_and_in_place_once(tmp_path):
    coalesced = plan_run(read_settings(compose_cfg(MGM_8X7B_6X4090 + [f"{KEY}=false"], tmp_path)), [])
    in_place = plan_run(read_settings(compose_cfg(MGM_8X7B_6X4090 + [f"{KEY}=true"], tmp_path)), [])
    twice = _gathered(coalesced)["ZeRO-3 gathered module (flat buffer + per-parameter copies)"]
    once = _gathered(in_place)["ZeRO-3 gathered module (straight into the parameters' buffers)"]
    assert twice == 2 * once and once > 2.5 * GiB  # one Mixtral layer's experts in bf16: 2.63 GiB
    # DeepSpeed prefetches only below stage3_max_live_parameters (auto: capped at 1e9), which one Mixtral layer's
    # experts (1.4e9) already pass: nothing is prefetched here
    assert not any(size for item, size in _gathered(in_place).items() if item.startswith("ZeRO-3 prefetch"))
    assert coalesced.fits is False and in_place.fits is True


def test_the_sequential_gather_prefetches_one_parameter(tmp_path):
    """engine.py sets the prefetch bucket to 1 element under stage3_allgather_sequential, and the prefetch loop
    gathers whole parameters until the bucket is reached: the next one of the trace (the census at the issue's
    width saw a third expert stack in flight). The row holds one of the largest parameters."""
    from vlm_finetune.config import model_settings
    from vlm_finetune.models.registry import get_family

    cfg = compose_cfg(["model=tiny_mgm_moe", "trainer=zero3", "hardware=cpu", "hardware.devices=2",
                       "precision=32-true", f"{KEY}=true"], tmp_path)
    plan = plan_run(read_settings(cfg), [])
    model = get_family(cfg.model.family).build_model(model_settings(cfg.model), device="meta")
    model = model[0] if isinstance(model, tuple) else model
    largest = max(p.numel() for p in model.parameters())
    rows = _gathered(plan)
    assert rows["ZeRO-3 prefetch of the next parameter (sequential gather: bucket 1)"] == largest * 4  # float32
    assert "ZeRO-3 prefetch of the next module" not in rows


def test_auto_gathers_in_place_only_where_that_is_what_fits(tmp_path, capsys):
    plan = plan_with_suggestions(MGM_8X7B_6X4090)
    assert plan.fits and plan.choices[KEY] is True
    assert any(note.startswith(f"{KEY}=auto: true") for note in plan.notes)
    small = plan_run(read_settings(compose_cfg(["model=tiny_mgm_moe", "trainer=zero3", "hardware=4x4090"],
                                               tmp_path)), [])
    assert small.fits and small.choices[KEY] is False  # fits coalesced: the faster gather stays
    refused = plan_with_suggestions(MGM_8X7B_6X4090 + [f"{KEY}=false"])
    assert refused.fits is False
    first = refused.suggestions[0]
    assert f"{KEY}=true" in first.overrides and first.plan.fits


def test_the_deepspeed_config_applies_only_a_resolved_true(tmp_path):
    def applied(value: str) -> bool:
        settings = strategy_settings(compose_cfg(["trainer=zero3", f"{KEY}={value}"], tmp_path).trainer)
        config = deepspeed_config(settings, "bf16-mixed", 1, True, ZeroSizes(10**6, 10**7))
        return config["zero_optimization"]["stage3_allgather_sequential"]

    assert applied("true") is True and applied("false") is False and applied("auto") is False
    with pytest.raises(ConfigError, match="stage3_allgather_sequential"):
        applied("sometimes")
