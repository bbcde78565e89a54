"""The run folder belongs to one run at a time, and a run takes back only what it made: a lock held for the
run's life, what the folder held before Hydra touched it (so that a refused start removes only what it
created), the half-written files a killed run leaves, and whether the folder holds a finished run."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from vlm_finetune.errors import ConfigError
from vlm_finetune.io import sweep_partial_files

LOCK_NAME = ".vlm_finetune.lock"
# what the folder held before this invocation: {folder: set of entry names} (None: it did not exist)
_BEFORE: dict[str, set[str] | None] = {}
# an earlier run's record that Hydra rewrites (or appends to) at every start: {folder: {relative path: bytes}}
_RECORD: dict[str, dict[str, bytes | int]] = {}
RECORD_LIMIT_BYTES = 1 << 20  # a log file larger than this is restored by length (it is only appended to)


def note_folder(run_dir: Path) -> None:
    """What the run folder holds before this invocation writes to it (config.RunDirSnapshot calls it): its entries,
    and the earlier run's `.hydra/` files and log files, which Hydra overwrites or appends to before the run
    can refuse to start."""
    folder = Path(run_dir).resolve()
    _BEFORE[str(folder)] = {p.name for p in folder.iterdir()} if folder.is_dir() else None
    record: dict[str, bytes | int] = {}
    if folder.is_dir():
        for path in [*sorted((folder / ".hydra").glob("*")), *sorted(folder.glob("*.log"))]:
            if path.is_file():
                size = path.stat().st_size
                record[str(path.relative_to(folder))] = path.read_bytes() if size <= RECORD_LIMIT_BYTES else size
    _RECORD[str(folder)] = record


def _restore_record(folder: Path) -> None:
    """The earlier run's `.hydra/` files and logs as they were before this refused start."""
    record = _RECORD.get(str(folder), {})
    hydra_dir = folder / ".hydra"
    if hydra_dir.is_dir() and ".hydra" in (_BEFORE[str(folder)] or set()):
        for path in hydra_dir.iterdir():
            if path.is_file() and str(path.relative_to(folder)) not in record:
                path.unlink()
    for name, content in record.items():
        path = folder / name
        if isinstance(content, int):  # a large log: cut back to its earlier length
            if path.is_file() and path.stat().st_size > content:
                os.truncate(path, content)
        elif not path.is_file() or path.read_bytes() != content:
            path.write_bytes(content)


def remove_created(run_dir: Path) -> list[Path]:
    """After a start that was refused: remove what this invocation put into `run_dir` (Hydra's `.hydra/` and
    log file, the folder itself when it made it). Entries that were there before stay; without a snapshot
    (a sweep's job folder) nothing is removed."""
    folder = Path(run_dir).resolve()
    if str(folder) not in _BEFORE or not folder.is_dir():
        return []
    before = _BEFORE[str(folder)] or set()
    new = [entry for entry in folder.iterdir() if entry.name not in before]
    if not all(_made_by_hydra(entry) for entry in new):
        return []  # the run got further (a checkpoint, a CSV): keep what it wrote
    _restore_record(folder)
    if _BEFORE[str(folder)] is None:
        shutil.rmtree(folder, ignore_errors=True)
        return [folder]
    for entry in new:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return new


def _made_by_hydra(entry: Path) -> bool:
    return entry.name in (".hydra", LOCK_NAME) or entry.suffix == ".log"


class RunFolderLock:
    """An exclusive lock on the run folder for the life of the run (released by the kernel when the process
    dies, however it dies). A second run in the same folder stops at once with who holds it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._handle = None

    def acquire(self) -> RunFolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"the run folder {self.path.parent} is in use by another run ({holder}); wait for it "
                              "to end, or give this run its own folder (hydra.run.dir=...)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def sweep_checkpoint_leftovers(checkpoint_dir: Path) -> list[Path]:
    """Half-written checkpoints of a run that was killed while saving (`last.ckpt.*.tmp`, DeepSpeed's
    `last.ckpt.tmp/`): removed when the folder's next run starts (it holds the folder's lock)."""
    return sweep_partial_files(checkpoint_dir) if Path(checkpoint_dir).is_dir() else []


def finished_metrics(run_dir: Path, max_steps: int) -> dict | None:
    """The final metrics of a run that already finished in this folder at `max_steps` optimizer steps
    (metrics.json is written last, once training and validation are done), else None."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or int(metrics.get("global_step", -1)) != int(max_steps):
        return None
    return metrics
