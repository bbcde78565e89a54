"""Preemption warnings that arrive before training has started are remembered, not fatal.

SLURM may deliver its time-limit warning (`--signal=USR1@N`) up to a minute early, i.e. while Python is
still importing torch or loading weights. Without a handler, SIGUSR1's default action kills the process
(the job then fails instead of saving and requeueing). `install_early()` runs first thing in
`python -m vlm_finetune`; the checkpoint callback asks `received()` when it takes over the signals.

A warning that arrives once the run's work is done has nothing left to save, but it can still kill the
process: Python resets its own handlers to the default action while the interpreter shuts down, and the
job then ends FAILED instead of COMPLETED. `ignore_after_finish()` ignores the signals from then on.

Ctrl-C (SIGINT) is a stop signal like SIGTERM once training runs (resume.ResumeCallback saves at the next
step boundary). Before that (reading data, loading weights) and after it, `stop_on_interrupt()` turns it into
`StopRequested`, which the entry point reports with what was kept, instead of Python's KeyboardInterrupt
(a traceback, or Lightning's silent exit 1 when it arrives inside `fit` before the first step).
"""
from __future__ import annotations

import signal

EARLY_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
_received: list[int] = []


def _remember(signum, frame) -> None:
    _received.append(signum)


def install_early(signums: tuple[int, ...] = EARLY_SIGNALS) -> None:
    """Remember these signals until a real handler is installed; handlers someone else set stay."""
    for signum in signums:
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _remember)


class StopRequested(Exception):
    """A stop signal arrived where no step boundary could take it (before training or after it)."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} arrived outside a training step")
        self.signum = int(signum)


def _raise_stop(signum, frame) -> None:
    raise StopRequested(signum)


def stop_on_interrupt() -> None:
    """Ctrl-C raises StopRequested (not KeyboardInterrupt) until the training loop's handler takes over."""
    signal.signal(signal.SIGINT, _raise_stop)


def received() -> int | None:
    """The first preemption signal that arrived before the training loop's handler, if any."""
    return _received[0] if _received else None


def ignore_after_finish(signums: tuple[int, ...] = EARLY_SIGNALS) -> None:
    """The run has finished (or saved and stopped): a preemption warning from now on is ignored (SIG_IGN
    survives interpreter shutdown; Python's own handlers do not)."""
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)
