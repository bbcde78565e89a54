"""Every trainer x hardware x precision combination composes and builds its strategy, or is rejected clearly;
profiles that ask for absent GPUs stop in seconds and leave nothing behind."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

from conftest import CONF_DIR, compose_cfg
from vlm_finetune.config import hardware_settings, strategy_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.hardware import Found, Hardware, preflight, resolve
from vlm_finetune.models.registry import get_family
from vlm_finetune.strategies import ZeroSizes, build_strategy, deepspeed_config

ROOT = Path(__file__).resolve().parent.parent
TRAINERS = sorted(p.stem for p in (Path(CONF_DIR) / "trainer").glob("*.yaml"))
HARDWARE = sorted(p.stem for p in (Path(CONF_DIR) / "hardware").glob("*.yaml"))
# auto resolves to one of the others from the hardware (tests/test_auto_choice.py); nf4-fp32 follows nf4's rules
# with a float32 engine (test_nf4_fp32_under_zero3_is_a_float32_engine_that_partitions_first)
PRECISIONS = sorted(p.stem for p in (Path(CONF_DIR) / "precision").glob("*.yaml") if p.stem not in ("auto", "nf4-fp32"))


def _expected_rejection(trainer: str, hw: Hardware, precision: str) -> str | None:
    """The rule each combination must follow, written independently of strategies.check_combination."""
    if trainer == "single" and hw.world_size > 1:
        return "trainer=single runs one process"
    if precision == "fp16-mixed" and hw.accelerator != "gpu":
        return "fp16-mixed needs a GPU"
    return None


def test_profiles_exist():
    assert {"single", "ddp", "fsdp", "zero2", "zero2_offload", "zero3", "zero3_offload"} <= set(TRAINERS)
    assert {"cpu", "1xa6000", "4x4090", "6x4090", "8xa100_40g", "8xa100_80g", "1xh100", "8xh100", "2x8xa100_80g",
            "auto"} <= set(HARDWARE)
    assert {"32-true", "bf16-mixed", "bf16-true", "fp16-mixed", "nf4"} <= set(PRECISIONS)
    assert (Path(CONF_DIR) / "precision" / "nf4-fp32.yaml").exists()


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("hardware", HARDWARE)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_combination_builds_or_is_rejected(trainer, hardware, precision, tmp_path):
    # a number: GPU profiles default to micro-batch auto, which the run resolves before the strategy is built
    cfg = compose_cfg([f"trainer={trainer}", f"hardware={hardware}", f"precision={precision}",
                       "data.micro_batch_size=4"], tmp_path)
    hw = resolve(hardware_settings(cfg.hardware))
    assert hw.devices >= 1 and hw.num_nodes >= 1
    expected = _expected_rejection(trainer, hw, precision)
    if expected:
        with pytest.raises(ConfigError, match=expected):
            build_strategy(strategy_settings(cfg.trainer), cfg.precision.name, cfg.data.micro_batch_size,
                           get_family("glm4v"), hw, ZeroSizes(1000, 1000))
        return
    strategy = build_strategy(strategy_settings(cfg.trainer), cfg.precision.name, cfg.data.micro_batch_size,
                           get_family("glm4v"), hw, ZeroSizes(1000, 1000))
    kind = {"single": str, "ddp": DDPStrategy, "fsdp": ModelParallelStrategy,
            "fsdp_offload": ModelParallelStrategy}.get(trainer, DeepSpeedStrategy)
    assert isinstance(strategy, kind)
    if trainer == "single":
        assert strategy == "auto"
    if kind is DeepSpeedStrategy:
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == (3 if trainer.startswith("zero3") else 2)
        assert ("offload_optimizer" in zero) == trainer.endswith("offload")
        assert ("offload_param" in zero) == (trainer == "zero3_offload")
        assert ("bf16" in strategy.config) == (precision in ("bf16-mixed", "bf16-true", "nf4"))
        # nf4 under ZeRO-3: the 4-bit model is partitioned before the engine starts (vlm_finetune/zero3_nf4.py)
        first = type(strategy).__name__.endswith("PartitionFirst")
        assert first == (precision == "nf4" and trainer.startswith("zero3"))
        for offloaded in ("offload_optimizer", "offload_param"):  # pinned host memory only serves GPU copies
            if offloaded in zero:
                assert zero[offloaded]["pin_memory"] == (hw.accelerator == "gpu")
    if kind is ModelParallelStrategy:  # FSDP2: data parallel over every rank, no tensor parallelism
        assert strategy._data_parallel_size == hw.world_size and strategy._tensor_parallel_size == 1
        assert strategy.process_group_backend == ("nccl" if hw.accelerator == "gpu" else "gloo")


@pytest.mark.parametrize("trainer", ["zero3", "zero3_offload"])
def test_nf4_fp32_under_zero3_is_a_float32_engine_that_partitions_first(trainer, tmp_path):
    cfg = compose_cfg([f"trainer={trainer}", "hardware=cpu", "hardware.devices=2", "precision=nf4-fp32"], tmp_path)
    strategy = build_strategy(strategy_settings(cfg.trainer), cfg.precision.name, 4, get_family("mgm"),
                              resolve(hardware_settings(cfg.hardware)), ZeroSizes(1000, 1000))
    assert isinstance(strategy, DeepSpeedStrategy) and type(strategy).__name__.endswith("PartitionFirst")
    assert "bf16" not in strategy.config and "fp16" not in strategy.config


def test_deepspeed_config_values(tmp_path):
    cfg = compose_cfg(["trainer=zero3_offload", "trainer.accumulate_grad_batches=4", "data.micro_batch_size=2"], tmp_path)
    config = deepspeed_config(strategy_settings(cfg.trainer), "bf16-mixed", 2, on_gpu=True,
                              sizes=ZeroSizes(3_000_000, 40_000_000))
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert "gradient_accumulation_steps" not in config  # Lightning sets it from trainer.accumulate_grad_batches
    zero = config["zero_optimization"]
    # auto: the buckets hold the 3 M trainable elements, two 40 M layers live, one kept for reuse
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 3_000_000
    assert zero["stage3_max_live_parameters"] == 80_000_000 and zero["stage3_max_reuse_distance"] == 40_000_000
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    # never above DeepSpeed's own defaults, and a number in the profile is used as given
    big = deepspeed_config(strategy_settings(cfg.trainer), "bf16-mixed", 2, True, ZeroSizes(9 * 10**9, 2 * 10**9))
    assert big["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert big["zero_optimization"]["stage3_max_live_parameters"] == 1_000_000_000
    given = compose_cfg(["trainer=zero3", "trainer.reduce_bucket_size=2e7", "trainer.stage3_max_reuse_distance=0"],
                        tmp_path)
    mine = deepspeed_config(strategy_settings(given.trainer), "bf16-mixed", 2, True, ZeroSizes(3_000_000, 40_000_000))
    assert mine["zero_optimization"]["reduce_bucket_size"] == 20_000_000
    assert mine["zero_optimization"]["stage3_max_reuse_distance"] == 0


def test_preflight_names_expected_found_and_fix():
    hw = Hardware("4x4090", "gpu", 4, 1, 24.0, True)
    with pytest.raises(ConfigError) as err:
        preflight(hw, "bf16-mixed", found=Found(0, (), 0.0, False))
    text = str(err.value)
    assert "hardware=4x4090 expects 4 GPU(s) per node x 1 node(s), 24 GiB each" in text
    assert "found 0 GPU(s)" in text and "hardware=auto" in text
    with pytest.raises(ConfigError, match="less memory per GPU"):
        preflight(hw, "bf16-mixed", found=Found(4, ("NVIDIA GeForce RTX 3090",) * 4, 11.8, True))
    with pytest.raises(ConfigError, match="needs bf16"):
        preflight(Hardware("x", "gpu", 1, 1, 16.0, True), "bf16-mixed", found=Found(1, ("Tesla V100",), 16.0, False))
    preflight(hw, "bf16-mixed", found=Found(4, ("NVIDIA GeForce RTX 4090",) * 4, 23.6, True))  # fits


def test_auto_profile_resolves_to_what_is_found(tmp_path):
    cfg = compose_cfg(["hardware=auto"], tmp_path)
    assert resolve(hardware_settings(cfg.hardware), Found(0, (), 0.0, False)).accelerator == "cpu"
    hw = resolve(hardware_settings(cfg.hardware), Found(2, ("NVIDIA H100",) * 2, 79.1, True))
    assert (hw.accelerator, hw.devices, hw.gpu_memory_gib) == ("gpu", 2, 79.1)


def test_headline_command_stops_fast_without_gpus(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has GPUs")
    run_dir = tmp_path / "run"
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "vlm_finetune", "trainer=zero3", "hardware=4x4090",
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, VLM_FINETUNE_CACHE=str(tmp_path / "cache")))
    elapsed = time.time() - started
    assert result.returncode == 2
    assert "hardware=4x4090 expects 4 GPU(s)" in result.stderr and "found 0 GPU(s)" in result.stderr
    assert elapsed < 30, elapsed
    assert not run_dir.exists()  # no folder, config or checkpoint left behind
    assert not (tmp_path / "cache").exists()  # nothing was built or loaded
