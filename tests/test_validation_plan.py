"""The plan's validation phase (memory/validation.py): `data.val_batch_size=auto` picks the largest batch whose
validation peak stays within the training step's, an asked batch that exceeds the step becomes the plan's peak,
and a run writes the batch it chose into its config."""
from __future__ import annotations

import pytest

from conftest import FAST, compose_cfg
from vlm_finetune.config import read_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.memory.planner import plan_run
from vlm_finetune.memory.validation import AUTO_CAP


def _plan(overrides: list[str], tmp_path):
    return plan_run(read_settings(compose_cfg(overrides, tmp_path)), overrides)


@pytest.mark.parametrize("overrides", [
    ["model=tiny_glm41v", "data.num_val=1000"],
    ["model=mgm_8x7b", "trainer=zero3", "hardware=6x4090", "precision=bf16-mixed", "data.micro_batch_size=1"],
])
def test_auto_takes_the_largest_validation_batch_within_the_step_peak(overrides, tmp_path):
    plan = _plan(overrides, tmp_path)
    chosen = plan.validation
    assert chosen.why.startswith("auto") and chosen.batch_size >= 1
    assert chosen.allocated_bytes <= plan.allocated_bytes
    cap = AUTO_CAP * plan.micro_batch_size
    if chosen.batch_size < cap:  # one more sample would pass the step's peak
        bigger = _plan(overrides + [f"data.val_batch_size={chosen.batch_size + 1}"], tmp_path)
        assert bigger.validation.allocated_bytes > plan.allocated_bytes == bigger.allocated_bytes
    assert plan.validation_excess == 0 and plan.peak_bytes == plan.total()


def test_an_asked_validation_batch_above_the_step_becomes_the_peak_and_says_so(tmp_path):
    base = ["model=mgm_8x7b", "trainer=zero3", "hardware=6x4090", "precision=bf16-mixed", "data.micro_batch_size=1"]
    auto = _plan(base, tmp_path)
    asked = _plan(base + ["data.val_batch_size=100"], tmp_path)
    assert asked.validation.batch_size == 100 and asked.validation_excess > 0
    assert asked.peak_bytes == asked.total() + asked.validation_excess > auto.peak_bytes
    assert not asked.fits  # 100 samples' key/value cache and forward do not fit beside the ZeRO-3 step
    assert "validation at batch 100 is the run's peak" in asked.render()
    # null: the training micro-batch, as before auto existed
    assert _plan(base + ["data.val_batch_size=null"], tmp_path).validation.batch_size == 1


def test_a_validation_batch_that_is_not_a_positive_number_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.val_batch_size"):
        read_settings(compose_cfg(["data.val_batch_size=0"], tmp_path))


def test_a_run_writes_the_validation_batch_auto_chose(shared_run):
    cfg, _, objects = shared_run
    chosen = cfg.data.val_batch_size  # train() writes what auto chose into the run's config
    assert isinstance(chosen, int) and 1 <= chosen <= 8  # FAST: 8 validation samples
    assert objects["datamodule"].val_dataloader().batch_size == chosen
    assert "data.val_batch_size" not in " ".join(FAST)
