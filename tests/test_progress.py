"""What the user watches: the training bar counts optimizer steps out of trainer.max_steps and shows the
supervised tokens per second and the padding fraction of each step's micro-batches; the parameter counts
printed at the start are the same under ZeRO-3 as in one process."""
from __future__ import annotations

import os
import re
import time

import lightning as L
import pytest

from conftest import compose_cfg, run_cli, write_conversation_file
from vlm_finetune.callbacks import StepProgressBar
from vlm_finetune.data.sample import IGNORE_INDEX
from vlm_finetune.train import train

ANSWER_WORDS = [1, 60, 3, 25, 2, 40, 8, 14]  # very different lengths: the micro-batches hold padding
COMMON = ["eval.generate=false", "trainer.log_every_n_steps=1", "data=conversations", "data.max_length=512",
          "lora.dropout=0.0", "data.micro_batch_size=2", "trainer.accumulate_grad_batches=2",
          "trainer.max_steps=3", "trainer.enable_progress_bar=true"]


def write_conversations(folder, text_only: bool = True):
    """8 conversations of very different lengths (the micro-batches hold padding); with `text_only`, every
    second one has no image."""
    return write_conversation_file(folder, ANSWER_WORDS, lambda i: text_only and i % 2 == 1, prompt="Say {i} things.")


@pytest.fixture(scope="module")
def varied_data(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("progress_data"))


def _data(folder) -> list[str]:
    return [f"data.path={folder / 'train.json'}", f"data.val_path={folder / 'val.json'}"]


class BatchRecorder(L.Callback):
    """What each optimizer step's micro-batches held, and when each step ended, seen independently of the bar."""

    def __init__(self):
        self.steps, self.current, self.times, self.seen = [], [0, 0, 0], [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.times:
            self.times.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        labels, mask = batch["labels"], batch["attention_mask"]
        self.current[0] += int((labels != IGNORE_INDEX).sum())
        self.current[1] += int((mask == 0).sum())
        self.current[2] += labels.numel()
        if trainer.global_step != self.seen:
            self.steps.append(tuple(self.current))
            self.times.append(time.perf_counter())
            self.current, self.seen = [0, 0, 0], trainer.global_step


def test_bar_counts_optimizer_steps_and_shows_tokens_and_padding(varied_data, tmp_path, capsys):
    recorder = BatchRecorder()
    metrics, objects = train(compose_cfg(COMMON + _data(varied_data), tmp_path), callbacks=[recorder])
    trainer = objects["trainer"]
    bar = trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    # 8 samples, 2 x 2 per step: step 3 is in the second epoch, and the bar did not start over
    assert trainer.global_step == 3 and trainer.current_epoch >= 1
    assert bar.train_progress_bar.total == 3
    assert bar.train_progress_bar.n == trainer.global_step == 3
    assert [s["step"] for s in bar.steps] == [1, 2, 3]
    assert len(recorder.steps) == 3
    for shown, (tokens, padded, positions), start, end in zip(bar.steps, recorder.steps, recorder.times,
                                                              recorder.times[1:]):
        assert (shown["supervised_tokens"], shown["padded"], shown["positions"]) == (tokens, padded, positions)
        assert shown["padding_fraction"] == pytest.approx(padded / positions, rel=1e-12)
        assert shown["tokens_per_second"] == pytest.approx(tokens / shown["seconds"], rel=1e-12)
        assert shown["seconds"] == pytest.approx(end - start, abs=0.1)  # the step's wall time
    # the first epoch's two steps saw every sample once: their supervised tokens are the data's
    processor = objects["processor"]
    samples = objects["datamodule"].train_samples
    expected = sum(int((processor.encode(samples[i], 512).labels != IGNORE_INDEX).sum()) for i in range(len(samples)))
    assert len(samples) == 8 and bar.steps[0]["supervised_tokens"] + bar.steps[1]["supervised_tokens"] == expected
    assert any(s["padded"] > 0 for s in bar.steps)  # lengths differ, so the bar has padding to show
    printed = capsys.readouterr().out
    last = bar.steps[-1]
    assert re.search(r"Step\b.*\b3/3\b", printed), printed[-2000:]
    assert f"tok/s={last['tokens_per_second']:.1f}" in printed and f"pad={last['padding_fraction']:.3f}" in printed
    assert "Epoch" not in printed


@pytest.mark.slow
@pytest.mark.distributed
def test_parameter_counts_and_bar_under_zero3(tmp_path):
    """The counts printed at the start (by the recipe and by the module once DeepSpeed has partitioned every
    parameter) equal the single-process counts; the bar, which sums its figures over ranks, reaches 2/2.
    Every sample has an image here (mixed batches under ZeRO-3 are test_mixed_batches' subject)."""
    varied_data = write_conversations(tmp_path, text_only=False)
    single = tmp_path / "single"
    metrics, _ = train(compose_cfg(COMMON + _data(varied_data) + ["trainer.max_steps=0"], single))
    expected = (metrics["trainable_parameters"], metrics["total_parameters"])
    assert 0 < expected[0] < expected[1]
    run_dir = tmp_path / "zero3"
    args = COMMON + _data(varied_data) + ["trainer=zero3", "hardware=cpu", "hardware.devices=2",
                                          "trainer.max_steps=2", "trainer.stage3_param_persistence_threshold=0",
                                          f"hydra.run.dir={run_dir}"]
    result = run_cli(args, timeout=240, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    def as_int(text: str) -> int:
        return int(text.replace(",", ""))

    recipe = [(as_int(a), as_int(b)) for a, b in re.findall(r": ([\d,]+) trainable / ([\d,]+) parameters", out)]
    module = [(as_int(a), as_int(b)) for a, b in re.findall(r"parameters: ([\d,]+) trainable of ([\d,]+) total", out)]
    assert recipe == [expected], out[-3000:]
    assert len(module) == 2 and set(module) == {expected}, out[-3000:]  # each rank logs its count
    assert re.search(r"Step\b.*\b2/2\b.*tok/s=[\d.]+.*pad=0\.\d{3}", out), out[-3000:]


def test_resumed_run_bar_starts_at_the_checkpoint_step(varied_data, tmp_path):
    class StartPosition(L.Callback):  # the bar as the first batch of the resumed run starts
        seen = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            bar = trainer.progress_bar_callback
            if self.seen is None:
                self.seen = (bar.train_progress_bar.n, bar.train_progress_bar.total, trainer.global_step)

    overrides = COMMON + _data(varied_data) + ["checkpoint.every_n_steps=1"]
    train(compose_cfg(overrides + ["trainer.max_steps=2"], tmp_path))
    start = StartPosition()
    _, objects = train(compose_cfg(overrides + ["trainer.max_steps=3", "resume=auto"], tmp_path), callbacks=[start])
    assert start.seen == (2, 3, 2)
    bar = objects["trainer"].progress_bar_callback
    assert bar.train_progress_bar.n == 3 and [s["step"] for s in bar.steps] == [3]
