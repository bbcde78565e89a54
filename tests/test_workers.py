"""Data loading in worker processes (data.num_workers): the same micro-batches, the same training, and an
exact resume, as loading in the training process (issue 15, point 5)."""
from __future__ import annotations

import pytest
from test_resume import SignalAt, _logged_losses, _trainable

from conftest import FAST, compose_cfg
from vlm_finetune.train import train

RUN = [o for o in FAST if not o.startswith("trainer.max_steps")] + [
    "trainer.max_steps=6", "trainer.log_every_n_steps=1", "eval.generate=false", "trainer.val_every_n_steps=null",
    "lora.dropout=0.1", "checkpoint.every_n_steps=3", "data.num_train=24"]  # 6 micro-batches an epoch


def _same(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow  # data workers in their own processes: 5 s
def test_workers_give_the_same_run_and_resume_exactly(tmp_path):
    _, inline = train(compose_cfg(RUN + ["data.num_workers=0"], tmp_path / "inline"))
    _, workers = train(compose_cfg(RUN + ["data.num_workers=2"], tmp_path / "workers"))
    assert _same(_trainable(inline["module"]), _trainable(workers["module"])) <= 1e-6
    assert _logged_losses(tmp_path / "workers") == _logged_losses(tmp_path / "inline")

    part = tmp_path / "part"
    stopped, _ = train(compose_cfg(RUN + ["data.num_workers=2"], part), callbacks=[SignalAt(4)])
    assert stopped == {"preempted": 1, "global_step": 4}
    resumed_metrics, resumed = train(compose_cfg(RUN + ["data.num_workers=2"], part))
    assert resumed_metrics["global_step"] == 6
    assert _same(_trainable(inline["module"]), _trainable(resumed["module"])) <= 1e-6
    assert [s for s, _ in _logged_losses(part)] == list(range(6))
