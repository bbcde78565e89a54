"""Memory monitor (fake memory provider on the CPU), spike detection, the out-of-memory report and exit code,
and the `auto` options' CPU behaviour."""
from __future__ import annotations

import sys

import lightning as L
import pytest
import torch

from conftest import FAST, compose_cfg
from vlm_finetune.config import model_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.memory.monitor import CSV_NAME, PNG_NAME, GiB, MemoryMonitor, PhaseRecord, find_spikes, read_csv
from vlm_finetune.memory.oom import OOM_REPORT

PHASE_BYTES = {"data loading": 1 * GiB, "vision forward": 2 * GiB, "LLM forward": 3 * GiB, "backward": 5 * GiB,
               "optimizer step": 4 * GiB, "validation": 7 * GiB, "checkpoint save": 6 * GiB}


class FakeStats:
    """Reports, for the phase the monitor is closing, the peak that phase is given in PHASE_BYTES."""

    def __init__(self):
        self.monitor = None
        self.resets = 0

    def max_allocated(self) -> int:
        return PHASE_BYTES.get(self.monitor.phase, 0)

    def max_reserved(self) -> int:
        return self.max_allocated() + GiB // 4

    def allocated(self) -> int:
        return 3 * GiB

    def reserved(self) -> int:
        return 8 * GiB

    def reset_peak(self) -> None:
        self.resets += 1


def fake_monitor(run_dir):
    stats = FakeStats()
    monitor = MemoryMonitor(run_dir, stats=stats, record_history=False)
    stats.monitor = monitor
    return monitor


class RaiseOutOfMemory(L.Callback):
    """Simulates CUDA running out of memory in the backward pass of optimizer step `step`."""

    def __init__(self, step: int = 2):
        self.step = int(step)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 23.99 GiB of which 1.10 GiB is free.")


def test_recurring_spikes_are_found_with_phase_and_period():
    """A synthetic run: 20 GiB steady, validation +6.1 GiB every 30 s (every 500 steps), one lone save spike."""
    records = []
    for step in range(0, 3000, 50):
        t = step * 0.06  # 50 steps = 3 s
        for phase in ("LLM forward", "backward", "optimizer step"):
            records.append(PhaseRecord(t, step, phase, 20 * GiB, 21 * GiB))
        if step % 500 == 0 and step:
            records.append(PhaseRecord(t + 1, step, "validation", int(26.1 * GiB), 27 * GiB))
    records.append(PhaseRecord(100.0, 1666, "checkpoint save", 30 * GiB, 31 * GiB))  # once: not recurring
    spikes = find_spikes(records)
    assert len(spikes) == 1
    spike = spikes[0]
    assert spike.phase == "validation" and spike.count == 5
    assert spike.period_s == pytest.approx(30.0) and spike.period_steps == 500
    assert spike.excess_bytes / GiB == pytest.approx(6.1, abs=0.01)
    assert spike.describe() == "every 30 s (500 steps), +6.1 GiB: validation"
    assert find_spikes([PhaseRecord(0, 0, "backward", 20 * GiB, 20 * GiB)] * 10) == []


def test_monitor_writes_peaks_per_phase_csv_and_png(tmp_path):
    """A tiny run with a fake provider: every phase is closed with its own peak, the CSV holds those numbers
    per step, the timeline PNG is drawn."""
    from vlm_finetune.train import train

    monitor = fake_monitor(tmp_path)
    cfg = compose_cfg(FAST + ["trainer.max_steps=3", "trainer.val_every_n_steps=2", "checkpoint.every_n_steps=null"],
                      tmp_path)
    train(cfg, callbacks=[monitor])
    records = read_csv(tmp_path / CSV_NAME)
    seen = {r.phase for r in records}
    assert {"vision forward", "LLM forward", "backward", "optimizer step", "validation",
            "checkpoint save", "data loading"} <= seen
    for r in records:
        if r.phase in PHASE_BYTES:
            assert r.peak_allocated == PHASE_BYTES[r.phase], r
            assert r.peak_reserved == PHASE_BYTES[r.phase] + GiB // 4
    backward_steps = [r.step for r in records if r.phase == "backward"]
    assert backward_steps == [0, 1, 2]  # one backward per optimizer step (accumulation 1)
    assert [r.step for r in records if r.phase == "validation"] == [2]  # inside fit (the final one runs after)
    assert (tmp_path / PNG_NAME).stat().st_size > 1000


def test_out_of_memory_writes_report_exits_non_zero_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """A simulated torch.OutOfMemoryError in backward at step 2 of `python -m vlm_finetune`: exit code 3, a
    report naming the phase, the failed allocation and the planner's advice; no adapter, no half-written file."""
    from vlm_finetune.__main__ import main

    run_dir = tmp_path / "run"
    overrides = FAST + ["trainer.max_steps=4", "checkpoint.every_n_steps=1", f"hydra.run.dir={run_dir}",
                        "+callbacks.monitor._target_=test_memory.fake_monitor", f"+callbacks.monitor.run_dir={run_dir}",
                        "+callbacks.oom._target_=test_memory.RaiseOutOfMemory", "+callbacks.oom.step=2"]
    monkeypatch.setattr(sys, "argv", ["vlm_finetune", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 3
    report = (run_dir / OOM_REPORT).read_text()
    assert "phase: backward (optimizer step 2)" in report
    assert "allocation that failed: 2.00 GiB" in report
    assert "peak allocated in this phase: 5.00 GiB" in report  # the fake's backward peak
    assert "memory snapshot: not written (CPU run" in report
    assert "predicted peak 0." in report  # the planner ran on the run's own overrides (tiny model: < 1 GiB)
    assert not (run_dir / "adapter").exists()
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():  # a checkpoint from an earlier step is whole and readable
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    records = read_csv(run_dir / CSV_NAME)
    assert [r.step for r in records if r.phase == "backward"] == [0, 1]


def test_auto_options_need_a_gpu(tmp_path):
    from vlm_finetune.train import check_config

    with pytest.raises(ConfigError, match="micro_batch_size=auto searches with real training steps on the GPU"):
        check_config(compose_cfg(["data.micro_batch_size=auto"], tmp_path))
    with pytest.raises(ConfigError, match="activation_checkpointing=auto chooses .* no GPU"):
        check_config(compose_cfg(["model.activation_checkpointing=auto"], tmp_path))
    with pytest.raises(ConfigError, match="must be a positive integer or auto"):
        check_config(compose_cfg(["data.micro_batch_size=0"], tmp_path))


def test_largest_fitting_micro_batch_and_accumulation_keep_the_global_batch():
    from vlm_finetune.autotune import largest_fitting, micro_batch_for_global

    tried = []

    def step(size):  # fits up to 11
        tried.append(size)
        if size > 11:
            raise torch.OutOfMemoryError("simulated")

    assert largest_fitting(step, 64) == 11
    assert tried[:5] == [1, 2, 4, 8, 16]
    assert micro_batch_for_global(11, 64, 2) == (8, 4)  # 8 x 4 accumulation x 2 GPUs = 64
    assert micro_batch_for_global(11, 30, 1) == (10, 3)
    with pytest.raises(ConfigError, match="even a micro-batch of 1"):
        largest_fitting(lambda size: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), 8)


def test_checkpointing_only_the_first_n_layers_saves_memory_in_between(tmp_path):
    """model.activation_checkpointing=N checkpoints the first N decoder layers: autograd keeps less for
    backward than with none checkpointed and more than with all."""
    from vlm_finetune.models.glm4v.family import GLM4V
    from vlm_finetune.models.registry import get_family
    from vlm_finetune.trainability import apply_activation_checkpointing

    def saved_bytes(value):
        cfg = compose_cfg([f"model.activation_checkpointing={value}"], tmp_path)
        model = get_family("glm4v").build_model(model_settings(cfg.model))
        apply_activation_checkpointing(model, GLM4V, cfg.model.activation_checkpointing)
        model.train()
        layers = [m for m in model.modules() if isinstance(m, GLM4V.decoder_layer_classes)]
        flags = [bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers]
        sizes = []

        def pack(t):
            sizes.append(t.untyped_storage().nbytes())
            return t

        ids = torch.randint(5, 300, (1, 64))
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model.language_model(inputs_embeds=embeds, use_cache=False)
        return flags, sum(sizes)

    flags0, none = saved_bytes("false")
    flags1, one = saved_bytes(1)
    flags2, both = saved_bytes("true")
    assert flags0 == [False, False] and flags1 == [True, False] and flags2 == [True, True]
    assert none > one > both
    with pytest.raises(ConfigError, match="has 2 decoder layers"):
        apply_activation_checkpointing(get_family("glm4v").build_model(model_settings(compose_cfg([], tmp_path).model)), GLM4V, 3)
