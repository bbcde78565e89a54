"""What a run chooses from the hardware when nothing is given: `precision=auto` (bf16-mixed on GPUs with bf16,
fp16-mixed without, 32-true on the CPU) and, on GPU profiles, `data.micro_batch_size=auto` (the largest micro-batch
the memory plan fits, the global batch kept by accumulation); the plan and the start line say what was chosen.
Third-party noise at start is silenced."""
from __future__ import annotations

import logging
import os

import pytest
import torch
import yaml

from vlm_finetune.config import settings_for
from vlm_finetune.hardware import resolve
from vlm_finetune.memory.report import GiB
from vlm_finetune.plan import plan_memory, plan_with_suggestions
from vlm_finetune.precision import resolve_precision

MGM_8X7B = ["model=mgm_8x7b", "trainer=zero3", "hardware=6x4090"]


def test_precision_and_micro_batch_follow_the_hardware_profile():
    assert resolve_precision("auto", "gpu", True, "x")[0] == "bf16-mixed"
    assert resolve_precision("auto", "gpu", False, "x")[0] == "fp16-mixed"
    assert resolve_precision("auto", "cpu", True, "cpu") == (
        "32-true", "precision=auto: 32-true (hardware=cpu is the CPU: float32 weights and compute)")
    assert resolve_precision("nf4", "gpu", True, "x") == ("nf4", None)  # a given precision is kept, no note

    cpu = settings_for([])  # the default run: unchanged on the CPU
    assert (cpu.precision, cpu.data.micro_batch_size, cpu.accumulate_grad_batches) == ("32-true", 32, 1)
    assert cpu.auto_choices == ("precision=auto: 32-true (hardware=cpu is the CPU: float32 weights and compute)",)
    gpu = settings_for(["hardware=6x4090"])
    assert (gpu.precision, gpu.data.micro_batch_size) == ("bf16-mixed", "auto")
    assert "supports bf16" in gpu.auto_choices[0]
    no_bf16 = settings_for(["hardware=4x4090", "hardware.supports_bf16=false"])
    assert no_bf16.precision == "fp16-mixed" and "has no bf16" in no_bf16.auto_choices[0]
    given = settings_for(["hardware=6x4090", "precision=32-true", "data.micro_batch_size=4",
                          "data=conversations", "data.path=x.json"])
    assert (given.precision, given.data.micro_batch_size, given.auto_choices) == ("32-true", 4, ())
    assert settings_for(["data=conversations", "data.path=x.json"]).data.micro_batch_size == 4  # its own default
    if not torch.cuda.is_available():  # hardware=auto on a machine without GPUs: the CPU's defaults
        machine = settings_for(["hardware=auto"])
        assert (machine.precision, machine.data.micro_batch_size) == ("32-true", 32)


def test_mgm_8x7b_on_six_4090s_fits_with_what_auto_chose():
    """The mission's command with nothing but model, trainer and hardware: bf16-mixed and the largest
    micro-batch the plan fits, 32 samples per GPU per step kept (6 x 32 = 192); one more sample does not fit.
    ZeRO-3 still builds partitioned (the micro-batch comes from the plan, not from steps on a whole model), and
    the run's start takes the same micro-batch."""
    from vlm_finetune.autotune import resolve_planned_micro_batch

    plan = plan_memory(MGM_8X7B)
    micro, accumulation = plan.micro_batch_size, plan.accumulate_grad_batches
    assert plan.precision == "bf16-mixed" and plan.fits is True and plan.load.fits is True
    assert plan.load.partitioned
    assert micro * accumulation * 6 == 192 and 32 % micro == 0
    bigger = next(size for size in range(micro + 1, 33) if 32 % size == 0)
    assert plan_memory([*MGM_8X7B, f"data.micro_batch_size={bigger}"]).fits is False
    text = plan.render()
    assert f"precision bf16-mixed; micro-batch {micro} x 256 tokens, accumulation {accumulation}" in text
    assert "note: precision=auto: bf16-mixed (hardware=6x4090 supports bf16" in text
    assert (f"note: data.micro_batch_size=auto: micro-batch {micro} x accumulation {accumulation} x 6 device(s) = "
            "global batch 192 (data.batch_per_device 32 x trainer.accumulate_grad_batches 1 x 6), the largest the "
            "plan fits") in text
    settings = settings_for(MGM_8X7B)
    assert resolve_planned_micro_batch(settings, resolve(settings.hardware), MGM_8X7B) == (micro, accumulation)


def test_half_precision_is_suggested_before_offload():
    """GLM-4V-9B in float32 on one A6000 does not fit; the 16-bit base is offered before CPU offload."""
    plan = plan_with_suggestions(["model=glm4v_9b", "hardware=1xa6000", "precision=32-true",
                                  "data.micro_batch_size=1"])
    labels = [s.label for s in plan.suggestions]
    assert plan.fits is False and "precision=bf16-mixed (the frozen base in 16 bits)" in labels, labels
    half = labels.index("precision=bf16-mixed (the frozen base in 16 bits)")
    assert all(half < i for i, label in enumerate(labels) if "offload" in label)
    assert plan.suggestions[half].plan.peak_bytes < plan.peak_bytes - 10 * GiB  # 8.9 B frozen weights, 2 bytes less


def test_start_noise_is_silenced_in_process():
    import vlm_finetune  # noqa: F401  (quiet_start runs on import)

    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() == logging.ERROR
    record = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, "Setting accelerator to CPU. If you have "
                               "GPU or other accelerator, we were unable to detect it.", None, None)
    other = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, "something about the run", None, None)
    assert not logging.getLogger("DeepSpeed").filter(record) and logging.getLogger("DeepSpeed").filter(other)


@pytest.mark.slow
def test_plan_and_a_default_run_start_without_third_party_warnings(tmp_path):
    """A clean start: the plan of the mission's command and a one-step default run on the CPU print nothing to
    stderr but progress bars, and no warning anywhere; the run says what precision auto chose (32-true, as
    before) and writes it into its config.yaml."""
    from conftest import run_cli

    env = dict(os.environ, VLM_FINETUNE_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    plan = run_cli(MGM_8X7B, timeout=300, env=env, module="vlm_finetune.plan")
    assert plan.returncode == 0 and "verdict: FITS" in plan.stdout, plan.stderr[-3000:]
    assert plan.stderr == "", plan.stderr
    run_dir = tmp_path / "run"
    run = run_cli(["trainer.max_steps=1", "data.num_train=64", "data.num_val=8", "eval.max_new_tokens=2",
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"], timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "vlm_finetune: precision=auto: 32-true (hardware=cpu is the CPU" in run.stdout
    for stream in (plan.stdout, run.stdout, run.stderr):
        assert not [line for line in stream.splitlines() if "warn" in line.lower()], stream[-3000:]
    leftover = [line for line in run.stderr.splitlines() if line.strip() and "Loading weights" not in line
                and "Writing model shards" not in line]
    assert leftover == [], run.stderr[-3000:]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["precision"]["name"] == "32-true" and config["data"]["micro_batch_size"] == 32


def test_a_resumed_run_keeps_the_micro_batch_its_start_chose(tmp_path):
    """With micro-batch auto, a checkpoint of the run (saved with the micro-batch and accumulation auto chose) is
    this run's: resuming takes them from it. Another setting still stops the resume."""
    from vlm_finetune.checkpointing import CHECKPOINT_DIR, FORMAT_VERSION, LAST, CheckpointError, run_fingerprint
    from vlm_finetune.resume import open_resume_checkpoint

    settings = settings_for(["hardware=1xa6000"])
    assert settings.data.micro_batch_size == "auto"
    chosen = settings.replace(data=settings.data.replace(micro_batch_size=8), accumulate_grad_batches=4)
    path = tmp_path / CHECKPOINT_DIR / LAST
    path.parent.mkdir()
    torch.save({"state_dict": {}, "vlm_finetune": {"format_version": FORMAT_VERSION,
                                                   "fingerprint": run_fingerprint(chosen, 1)}}, path)
    found, checkpoint = open_resume_checkpoint(settings, tmp_path, 1)
    assert found == path and checkpoint["vlm_finetune"]["fingerprint"]["data.micro_batch_size"] == 8
    with pytest.raises(CheckpointError, match="seed"):
        open_resume_checkpoint(settings.replace(seed=1), tmp_path, 1)
