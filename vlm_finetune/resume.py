"""Exact resume and preemption: `ResumeCallback` saves `<run>/checkpoints/last.ckpt` at optimizer-step
boundaries (every `checkpoint.every_n_steps`, and when a preemption or stop signal arrives) with the RNG
states and the run's fingerprint; on SLURM's warning it saves, requeues the job (or hands over to submitit's
handler) and stops; on a stop signal (SIGTERM: scancel, Kubernetes, docker stop) it saves and stops without
requeueing, and the run exits non-zero. `open_resume_checkpoint` / `resume_parts` wire a run to the
checkpoint it continues from."""
from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch

from vlm_finetune.checkpointing import (
    CHECKPOINT_DIR,
    FORMAT_VERSION,
    LAST,
    AtomicCheckpointIO,
    CheckpointError,
    check_compatible,
    find_resume_checkpoint,
    load_checkpoint_file,
    plain_rng_states,
    restore_rng_states,
    run_fingerprint,
    trainable_shapes,
)
from vlm_finetune.errors import ConfigError
from vlm_finetune.hardware import env_global_rank
from vlm_finetune.io import fsync_dir, fsync_tree, out_of_space, replace_folder
from vlm_finetune.running_strategy import is_deepspeed
from vlm_finetune.settings import RunSettings, is_auto
from vlm_finetune.signals import received

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The id to requeue: `<array job>_<task>` for array tasks, else the job id."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    job_id = slurm_job_id()
    if not job_id:
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        print(f"vlm_finetune: requeue of SLURM job {job_id} failed: {result.stderr.strip()}", flush=True)
        return False
    print(f"vlm_finetune: requeued SLURM job {job_id}", flush=True)
    return True


def logged_rows_before(csv_path: Path, step: int) -> list[dict]:
    """The CSV log's rows up to the resumed step. Rows logged after the last checkpoint are left out:
    the resumed run logs those steps again, so its CSV reads as one uninterrupted run."""
    if not csv_path.is_file():
        return []
    rows = []
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("step") and int(float(row["step"])) >= step:
                continue
            rows.append({k: (int(float(v)) if k == "step" else float(v))
                         for k, v in row.items() if v not in ("", None)})
    return rows


def restore_csv_rows(trainer, rows: list[dict]) -> None:
    """Put the earlier rows back into the CSV logger (Lightning's CSV writer deletes an existing
    metrics.csv when it starts) and write them at once."""
    from lightning.pytorch.loggers import CSVLogger

    if not rows or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.experiment.metrics[:0] = [dict(r) for r in rows]
            logger.save()


class ResumeCallback(L.Callback):
    """Periodic and on-signal checkpoints at optimizer-step boundaries; RNG and fingerprint in each."""

    def __init__(self, folder: Path, every_n_steps: int | None, fingerprint: dict,
                 signals: tuple[int, ...] = (), requeue: bool = True, stop_signals: tuple[int, ...] = ()):
        self.folder = Path(folder)
        self.every_n_steps = int(every_n_steps) if every_n_steps else 0
        self.fingerprint = fingerprint
        self.signals = tuple(signals)  # preemption warnings: save, requeue, stop
        self.stop_signals = tuple(s for s in stop_signals if s not in self.signals)  # save, stop, exit non-zero
        self.stopped_by_signal: int | None = None
        self.requeue = requeue
        self.preempt_requested = False
        self.preempted = False
        self.preempted_at_step: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._rng_to_restore: dict | None = None
        self._last_saved_step = -1

    @property
    def last_path(self) -> Path:
        return self.folder / LAST

    # -- signals ----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        # only a flag here: the save happens at the next optimizer-step boundary, never mid-step
        self.preempt_requested = True
        self._signal_received = signum

    def install_signal_handlers(self) -> None:
        for signum in self.signals + self.stop_signals:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
        early = received()
        if early in self.signals:  # the warning came while the run was starting: act on it at the first step
            self._on_signal(early, None)

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning has set its own handlers: its SIGTERM handler would end the run at the next batch
        # with SIGTERMException, before the step boundary where this callback saves
        self.install_signal_handlers()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.restore_signal_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.restore_signal_handlers()

    # -- saving -----------------------------------------------------------------------------------
    def _agreed(self, trainer, flag: bool) -> bool:
        """Every rank stops at the same step: a signal seen by any rank counts for all."""
        if trainer.world_size <= 1:
            return flag
        value = torch.tensor(float(flag), device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(value, reduce_op="sum") > 0)

    def save(self, trainer) -> None:
        for logger in trainer.loggers:  # the CSV holds every step up to the checkpoint
            logger.save()
        if is_deepspeed(trainer.strategy):
            self._save_deepspeed_folder(trainer)
        else:  # the full state: optimizer, loops, callbacks; written atomically by AtomicCheckpointIO
            trainer.save_checkpoint(str(self.last_path), weights_only=False)
        self._last_saved_step = trainer.global_step

    def _save_deepspeed_folder(self, trainer) -> None:
        """Every rank writes its partition into `last.ckpt.tmp`; once all have, rank 0 flushes the files to disk
        and swaps the folder in for `last.ckpt` (a kill at any moment leaves a whole checkpoint)."""
        tmp = self.folder / (LAST + ".tmp")
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
            self.folder.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("vlm_finetune.checkpoint.clear")
        try:
            trainer.save_checkpoint(str(tmp), weights_only=False)  # ends with a barrier
        except Exception as err:  # a full disk: last.ckpt stays as it was
            shutil.rmtree(tmp, ignore_errors=True)
            failed = out_of_space(err, self.last_path)
            if failed is not None:
                raise failed from err
            raise
        if trainer.is_global_zero:
            fsync_tree(tmp)
            replace_folder(tmp, self.last_path)
            fsync_dir(self.folder)
        trainer.strategy.barrier("vlm_finetune.checkpoint.swapped")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._rng_to_restore is not None:
            # restored here, right before the first resumed step, so that nothing between the restore
            # and the step (data loader set-up draws a seed) moves the generators
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if hasattr(loader, "mark_consumed") and isinstance(batch, dict) and "data_position" in batch:
            loader.mark_consumed(batch)
        if isinstance(batch, dict) and not batch.get("last_in_step", True):
            return  # mid-window: the accumulated gradients are not in any checkpoint
        step = trainer.global_step
        preempt = self._agreed(trainer, self.preempt_requested)
        periodic = self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_saved_step
        if preempt or periodic:
            self.save(trainer)
        if preempt:
            self.preempted, self.preempted_at_step = True, step
            trainer.should_stop = True
            signum = getattr(self, "_signal_received", None)
            if signum in self.stop_signals:  # asked to stop (scancel, docker stop): no requeue
                self.stopped_by_signal = signum
                if trainer.is_global_zero:
                    print(f"vlm_finetune: {signal.Signals(signum).name}: checkpoint saved at step {step} to "
                          f"{self.last_path}; stopping. To resume from step {step}, rerun the same command (same "
                          f"run folder, resume=auto)", flush=True)
                return
            if trainer.is_global_zero:
                print(f"vlm_finetune: preemption signal: checkpoint saved at step {step} to {self.last_path}",
                      flush=True)
            self._hand_over(trainer)

    def _hand_over(self, trainer) -> None:
        """After the save: let submitit requeue (its handler was there first), else requeue the SLURM job."""
        signum = getattr(self, "_signal_received", None)
        previous = self._previous_handlers.get(signum)
        if callable(previous) and getattr(previous, "__module__", "").startswith("submitit"):
            self.restore_signal_handlers()
            previous(signum, None)  # checkpoints the submission, requeues and exits
            return
        if self.requeue and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            requeue_slurm_job()

    # -- checkpoint contents ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"last_saved_step": self._last_saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self._last_saved_step = int(state_dict.get("last_saved_step", -1))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["vlm_finetune"] = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "trainable_shapes": trainable_shapes(pl_module),
            "rng_states": plain_rng_states(include_cuda=torch.cuda.is_available()),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint["vlm_finetune"]["rng_states"]


# -- the run's resume wiring -------------------------------------------------------------------------------
def signal_numbers(names) -> tuple[int, ...]:
    """[USR1, "SIGTERM", ...] -> signal numbers, with a clear error for a name that is not a signal."""
    numbers = []
    for name in names or []:
        key = "SIG" + str(name).upper().removeprefix("SIG")
        if not hasattr(signal, key):
            raise ConfigError(f"checkpoint signal {name!r} is not a signal name; use e.g. USR1, USR2, TERM")
        numbers.append(int(getattr(signal, key)))
    return tuple(numbers)


def open_resume_checkpoint(settings: RunSettings, run_dir: Path, world_size: int) -> tuple[Path | None, dict | None]:
    """The checkpoint a run would continue from, opened and checked before any weight loads: it exists, it
    is readable, it is of the strategy's kind and its settings are this run's. Returns (path, checkpoint),
    or (None, None) when the run starts afresh. (Its tensor shapes are checked once the model is built.)"""
    strategy = settings.strategy
    if not strategy.resumable:
        return None, None
    path = find_resume_checkpoint(settings.checkpoint.resume, run_dir)
    if path is None:
        return None, None
    if path.exists() and path.is_dir() != strategy.checkpoint_is_folder:
        kind = "DeepSpeed's checkpoint folder" if path.is_dir() else "a single-file checkpoint"
        raise CheckpointError(f"checkpoint {path} is {kind}, which trainer={strategy.name} cannot resume from; "
                              "resume with the trainer that wrote it, or start a new run folder (resume=never)")
    checkpoint = load_checkpoint_file(path)
    fingerprint = run_fingerprint(settings, world_size)
    if is_auto(settings.data.micro_batch_size):  # auto continues with what the run chose at its start
        for key in ("data.micro_batch_size", "trainer.accumulate_grad_batches"):
            fingerprint[key] = checkpoint["vlm_finetune"]["fingerprint"].get(key)
    check_compatible(checkpoint, path, fingerprint)
    return path, checkpoint


def resume_parts(settings: RunSettings, run_dir: Path, module, world_size: int, path: Path | None,
                 checkpoint: dict | None) -> tuple[ResumeCallback | None, Path | None, list, list]:
    """(checkpoint callback or None, checkpoint to resume from or None, trainer plugins, CSV rows to keep).
    `path` and `checkpoint` come from open_resume_checkpoint."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    plugins: list = []
    if SLURMEnvironment.detect():
        # the preemption signal is handled by ResumeCallback (atomic save at a step boundary, then requeue),
        # not by Lightning's handler, which saves from inside the signal handler in the middle of a step
        plugins.append(SLURMEnvironment(auto_requeue=False))
    strategy, saving = settings.strategy, settings.checkpoint
    if not strategy.resumable:
        if saving.resume not in (None, "never", "auto"):
            raise ConfigError(f"resume={saving.resume} works with trainer=single|ddp|zero*; trainer={strategy.name} "
                              "writes no resumable checkpoints yet (use resume=never)")
        return None, None, plugins, []
    if not strategy.checkpoint_is_folder:  # DeepSpeed writes its own folder (made atomic by ResumeCallback)
        plugins.append(AtomicCheckpointIO())
    fingerprint = run_fingerprint(settings, world_size)
    callback = ResumeCallback(run_dir / CHECKPOINT_DIR, saving.every_n_steps, fingerprint,
                              signal_numbers(saving.signals), requeue=saving.requeue,
                              stop_signals=signal_numbers(saving.stop_signals))
    rows: list = []
    if path is not None:
        check_compatible(checkpoint, path, fingerprint, trainable_shapes(module))
        step = int(checkpoint.get("global_step", 0))
        if step > settings.max_steps:
            raise CheckpointError(f"checkpoint {path} is at step {step}, "
                                  f"past trainer.max_steps={settings.max_steps}; "
                                  "raise trainer.max_steps or start a new run folder")
        if env_global_rank() == 0:
            rows = logged_rows_before(run_dir / "csv" / "metrics.csv", step)
            print(f"vlm_finetune: resuming from {path} at step {step}", flush=True)
    return callback, path, plugins, rows
