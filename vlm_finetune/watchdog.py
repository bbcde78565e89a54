"""A run that cannot go on ends, with a message, instead of hanging.

Two things can keep a training process alive without progress, and neither is seen by Python code on the
main thread:

- a rank stuck in a collective (another rank stopped, died, or ran a different sequence of collectives):
  gloo and NCCL wait up to half an hour by default, and the main thread is inside C++ all that time;
- a stop signal (SIGTERM from scancel, Kubernetes, docker stop) that arrives while the main thread is
  inside C++: Python runs its handler (resume.ResumeCallback: save at the next step boundary) only once
  the main thread is back in Python, which for a hung collective is never.

`RunWatchdog` runs a thread beside training. The main thread marks progress at every micro-batch and
validation batch; the thread ends the process when a multi-rank run has made none for
`trainer.collective_timeout_s` (the process groups get the same timeout, so the backend may raise first).
Signals reach the thread through `signal.set_wakeup_fd`: CPython's C-level handler writes the signal's
number to a pipe even while the main thread is blocked, so a stop signal is seen at once; the step
boundary then has `trainer.stop_grace_s` to save and stop as usual, after which the thread ends the
process (the last saved checkpoint stays whole: every save is an atomic rename). When it ends a process,
the thread also kills that process's children (the other ranks a launcher started, data-loader workers).
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

import lightning as L

HUNG_EXIT_CODE = 4  # 2: a refused start, 3: out of memory


class RunHung(RuntimeError):
    """A collective timed out (raised by the backend on the main thread), with the step it happened in."""

    exit_code = HUNG_EXIT_CODE


def hung_message(rank: int, where: str, what: str) -> str:
    return (f"rank {rank} {what} (the last thing it did: {where}): a rank is stuck in a collective or gone (another "
            "rank stopped, died, or ran different collectives, e.g. a vision tower skipped on a text-only batch). "
            "The run is ended; rerun to resume from the last checkpoint. A step that is legitimately slower needs "
            "a larger trainer.collective_timeout_s")


# what gloo and NCCL say when a collective waited past its timeout or its peer went away
_COLLECTIVE_FAILURES = ("Timed out", "timed out", "Connection reset by peer", "Connection closed by peer",
                        "Watchdog caught collective operation timeout", "NCCL communicator was aborted")


def is_collective_failure(err: BaseException) -> bool:
    """The error a process group raises when a collective times out or loses a peer."""
    return type(err).__name__ in ("DistBackendError", "DistNetworkError") or \
        any(text in str(err) for text in _COLLECTIVE_FAILURES)


def _child_pids(pid: int) -> list[int]:
    """The direct children of `pid`, read from /proc (Linux); none elsewhere."""
    children = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


class RunWatchdog(L.Callback):
    """Ends a training process that has stopped making progress, or that ignores a stop signal (see the
    module's docstring). `stop_signals`: the signals that ask the run to stop (exit 128 + the signal)."""

    def __init__(self, collective_timeout_s: float, stop_grace_s: float, stop_signals: tuple[int, ...] = (),
                 poll_s: float = 0.5):
        self.collective_timeout_s = float(collective_timeout_s)
        self.stop_grace_s = float(stop_grace_s)
        self.stop_signals = tuple(int(s) for s in stop_signals)
        self.poll_s = float(poll_s)
        self.where = "started training"
        self._last = time.monotonic()
        self._rank = 0
        self._multi_rank = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup_fd: int | None = None
        self._stop_signal: tuple[int, float] | None = None  # (signal, when it arrived)

    # -- main thread -------------------------------------------------------------------------------
    def mark(self, where: str) -> None:
        self.where = where
        self._last = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self._rank = int(trainer.global_rank)
        self._multi_rank = int(trainer.world_size) > 1
        self.mark(f"started training at step {trainer.global_step + 1}")
        if threading.current_thread() is threading.main_thread():
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            self._pipe = (read_fd, write_fd)
            self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="vlm_finetune-watchdog", daemon=True)
        self._thread.start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mark(f"started micro-batch {batch_idx} of step {trainer.global_step + 1}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mark(f"finished micro-batch {batch_idx}, {trainer.global_step} steps done")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.mark(f"started validation batch {batch_idx} at step {trainer.global_step}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.mark(f"finished validation batch {batch_idx} at step {trainer.global_step}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()

    def teardown(self, trainer, pl_module, stage) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if self._pipe is not None:
            if threading.current_thread() is threading.main_thread():
                signal.set_wakeup_fd(self._previous_wakeup_fd if self._previous_wakeup_fd is not None else -1)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    # -- watcher thread ----------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.is_set():
            self._read_signals()
            now = time.monotonic()
            if self._stop_signal is not None and now - self._stop_signal[1] > self.stop_grace_s:
                signum = self._stop_signal[0]
                self._end(128 + signum, f"{signal.Signals(signum).name} arrived {self.stop_grace_s:.0f} s ago and "
                          f"rank {self._rank} has not reached a step boundary (the last thing it did: "
                          f"{self.where}): ended without saving; rerun the command to resume from the last checkpoint")
            if self._multi_rank and now - self._last > self.collective_timeout_s:
                self._end(HUNG_EXIT_CODE, hung_message(self._rank, self.where,
                                                       f"made no progress for {now - self._last:.0f} s"))

    def _read_signals(self) -> None:
        if self._pipe is None:
            self._stop.wait(self.poll_s)
            return
        try:
            ready, _, _ = select.select([self._pipe[0]], [], [], self.poll_s)
            data = os.read(self._pipe[0], 512) if ready else b""
        except OSError:  # closed by close() on the main thread
            return
        for signum in data:
            if signum in self.stop_signals and self._stop_signal is None:
                self._stop_signal = (signum, time.monotonic())

    def _end(self, code: int, message: str) -> None:
        print(f"vlm_finetune: error: {message}", file=sys.stderr, flush=True)
        for child in _child_pids(os.getpid()):
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
        os._exit(code)
