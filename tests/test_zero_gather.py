"""ZeRO-3's gather in the plan and the run (issue 35): DeepSpeed's coalesced all-gather holds a gathered module
twice for a moment (its flat buffer, and each parameter's copy made from it); `trainer.stage3_allgather_sequential`
gathers each parameter into its own buffer (held once; DeepSpeed's prefetch bucket is then 1 element: one
parameter prefetched per module fetch, up to stage3_max_live_parameters). Its `auto` is true only where the plan fits
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
    """The plan's ZeRO-3 rows (gathered module, prefetch, kept for reuse, bucket): item -> bytes."""
    return {row.item: row.bytes for row in plan.rows if row.item.startswith("ZeRO-3")}


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


def test_the_sequential_gather_prefetches_up_to_the_live_limit(tmp_path):
    """engine.py sets the prefetch bucket to 1 element under stage3_allgather_sequential, so each module's fetch
    prefetches one whole parameter of the trace; every module fetches, so the prefetch walks ahead while fewer than
    stage3_max_live_parameters elements are gathered, the last parameter overshooting by up to its size (a traced
    step on two CPU ranks; the census at the issue's width saw max_live plus one expert stack). A module at or
    above the limit leaves nothing to prefetch."""
    from vlm_finetune.config import model_settings
    from vlm_finetune.models.registry import get_family

    def rows(live: int, reuse: int = 0) -> dict[str, int]:
        cfg = compose_cfg(["model=tiny_mgm_moe", "trainer=zero3", "hardware=cpu", "hardware.devices=2",
                           "precision=32-true", f"{KEY}=true", f"trainer.stage3_max_live_parameters={live}",
                           f"trainer.stage3_max_reuse_distance={reuse}"], tmp_path)
        return _gathered(plan_run(read_settings(cfg), []))

    cfg = compose_cfg(["model=tiny_mgm_moe"], tmp_path)
    model = get_family(cfg.model.family).build_model(model_settings(cfg.model), device="meta")
    model = model[0] if isinstance(model, tuple) else model
    largest = max(p.numel() for p in model.parameters())
    row = "ZeRO-3 prefetch along the trace (sequential gather: a parameter per module fetch, up to " \
          "stage3_max_live_parameters)"
    low, high, higher = rows(1), rows(10**8), rows(2 * 10**8)
    fetch = high["ZeRO-3 gathered module (straight into the parameters' buffers)"] // 4  # float32 elements
    assert 0 < fetch < 10**8
    assert low[row] == 0  # the module alone passes the limit
    assert high[row] == (10**8 + min(largest, fetch) - fetch) * 4
    assert higher[row] - high[row] == 10**8 * 4  # the prefetch fills what the limit leaves
    assert not any(item.startswith("ZeRO-3 prefetch of the next module") for item in high)
    # the limit counts the parameters kept gathered for reuse too: what they hold is not prefetched
    kept_rows = rows(10**8, reuse=4 * fetch)
    kept = next(size for item, size in kept_rows.items() if item.startswith("ZeRO-3 parameters kept")) // 4
    assert kept > fetch
    assert kept_rows[row] == (10**8 + min(largest, fetch) - fetch - kept) * 4


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
