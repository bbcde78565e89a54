"""A run that cannot go on ends: a rank stuck in a collective ends the run within trainer.collective_timeout_s
with a message naming the rank and the step, and SIGTERM ends a run within seconds even while it hangs
(issue 15, point 4). The multi-rank cases make rank 1 stop in its step (a probe callback) so that rank 0
waits in the step's gradient all-reduce, inside C++, where no Python signal handler runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from vlm_finetune.watchdog import HUNG_EXIT_CODE, RunWatchdog, is_collective_failure

PROBE = '''import os, time
from pathlib import Path
import lightning as L


class StallRank1(L.Callback):
    """Rank 1 stops at the start of step 3 (as if it were stuck elsewhere); rank 0 goes on into the collective."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            Path(os.environ["STALL_MARKER"]).write_text(str(time.time()))
            time.sleep(3600)
'''

RUN = ["trainer=ddp", "hardware=cpu", "hardware.devices=2", "trainer.max_steps=6", "data.num_train=32",
       "data.num_val=4", "data.micro_batch_size=2", "trainer.enable_progress_bar=false", "eval.generate=false",
       "checkpoint.every_n_steps=null", "+callbacks.stall._target_=stall_probe.StallRank1"]


def _start(tmp_path: Path, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "stall_probe.py").write_text(PROBE)
    marker = tmp_path / "stalled_at"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(probe), str(ROOT)]), STALL_MARKER=str(marker),
               PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "vlm_finetune", *RUN, *extra, f"hydra.run.dir={tmp_path / 'run'}"]
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    return process, marker


def _wait_for(marker: Path, process: subprocess.Popen, limit: float = 300) -> float:
    deadline = time.time() + limit
    while not marker.exists():
        if process.poll() is not None or time.time() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"the run never reached the stall (exit {process.returncode}):\n{out[-1500:]}\n{err[-3000:]}")
        time.sleep(0.2)
    time.sleep(0.5)
    return float(marker.read_text())


def _finish(process: subprocess.Popen, limit: float) -> tuple[str, str, float]:
    try:
        out, err = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the run did not end within {limit:.0f} s:\n{out[-1500:]}\n{err[-3000:]}")
    return out, err, time.time()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_stuck_in_a_collective_ends_the_run_within_the_timeout(tmp_path):
    process, marker = _start(tmp_path, ["trainer.collective_timeout_s=15"])
    stalled = _wait_for(marker, process)
    out, err, ended = _finish(process, 90)
    took = ended - stalled
    print(f"ended {took:.1f} s after rank 1 stalled (timeout 15 s), exit {process.returncode}")
    assert process.returncode != 0
    assert "made no progress for" in err or "saw a collective fail" in err, err[-3000:]
    assert "step 3" in err or "2 steps done" in err  # the message says where the rank was
    assert took < 15 + 15  # the timeout, the launcher's 5 s poll, and the processes' exit
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_ends_a_hung_run_within_seconds(tmp_path):
    process, marker = _start(tmp_path, ["trainer.collective_timeout_s=600", "trainer.stop_grace_s=5"])
    _wait_for(marker, process)
    sent = time.time()
    os.killpg(process.pid, signal.SIGTERM)  # what scancel and docker stop do: every process of the job
    out, err, ended = _finish(process, 60)
    took = ended - sent
    print(f"ended {took:.1f} s after SIGTERM (grace 5 s), exit {process.returncode}")
    assert process.returncode in (128 + signal.SIGTERM, -signal.SIGKILL), err[-3000:]
    assert "SIGTERM arrived 5 s ago" in err and "has not reached a step boundary" in err
    assert took < 30


@pytest.mark.slow  # a stuck process ended by the watchdog: 6 s
def test_the_watchdog_ends_a_process_that_ignores_sigterm_in_c_code(tmp_path):
    """One process, no training: the main thread sleeps inside C (a blocking read) with a Python SIGTERM
    handler installed, as when it waits in a collective; the watchdog thread ends it after the grace."""
    child = f'''
import os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
from vlm_finetune.watchdog import RunWatchdog
class T:
    global_rank, world_size, global_step = 0, 1, 0
signal.signal(signal.SIGTERM, lambda s, f: None)  # like ResumeCallback: act at the next step boundary
w = RunWatchdog(collective_timeout_s=600, stop_grace_s=2, stop_signals=(int(signal.SIGTERM),), poll_s=0.1)
w.on_train_start(T(), None)
read_fd, _ = os.pipe()
print("ready", flush=True)
os.read(read_fd, 1)  # blocks in C; the Python handler above cannot end it
'''
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "ready"
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert 2 <= time.time() - sent < 10
    assert "SIGTERM arrived 2 s ago" in err


def test_a_multi_rank_run_without_progress_is_ended_and_a_single_one_is_not(monkeypatch):
    ended = []

    class Trainer:
        global_rank, global_step = 1, 4

        def __init__(self, world_size):
            self.world_size = world_size

    for world_size in (2, 1):
        watchdog = RunWatchdog(collective_timeout_s=0.3, stop_grace_s=5, poll_s=0.05)
        monkeypatch.setattr(watchdog, "_end", lambda code, message: (ended.append((code, message)),
                                                                     watchdog._stop.set()))
        # the thread only: the wakeup pipe belongs to the main thread, which a pytest run keeps
        monkeypatch.setattr(threading, "main_thread", lambda: None)
        watchdog.on_train_start(Trainer(world_size), None)
        watchdog.on_train_batch_start(Trainer(world_size), None, None, 9)
        time.sleep(0.8)
        watchdog.close()
    assert len(ended) == 1  # the single process is not a collective: never ended for slowness
    code, message = ended[0]
    assert code == HUNG_EXIT_CODE
    assert message.startswith("rank 1 made no progress for") and "started micro-batch 9 of step 5" in message


def test_collective_failures_are_told_from_other_errors():
    assert is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Timed out waiting 15000ms"))
    assert is_collective_failure(RuntimeError("[pair.cc:598] Connection reset by peer"))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
