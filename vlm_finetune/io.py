"""Files and folders that are either whole or absent: every writer in the package goes through here, so that a
crash, a kill or a full disk leaves the previous file (or folder) or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

# names the writers below give their temporary files and folders (`sweep_partial_files` removes them)
PARTIAL_PATTERNS = ("*.tmp", "*.tmp-*", "*.tmp.*")


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path, folder: bool = False) -> None:
    """The mode an ordinary `open()` / `mkdir()` would give: mkstemp and mkdtemp make their files 0600 and
    folders 0700 whatever the umask, and a run written that way is unreadable to the rest of a group on a
    shared cluster."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (the directory entry reaches the disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file below `folder` to the disk (before the folder is swapped in)."""
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: Path, ext: str = "") -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (matplotlib, torch, safetensors);
    renamed over `path` when the block ends without an error, removed when it fails. `ext` ends the
    temporary name for writers that pick the format from it (matplotlib: ".png")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp" + ext, dir=path.parent)
    os.close(fd)
    follow_umask(Path(tmp))
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def save_torch_atomic(obj, path: Path) -> None:
    """torch.save atomically (a checkpoint killed mid-write leaves the previous one)."""
    import torch

    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)


def replace_folder(tmp: Path, folder: Path) -> None:
    """Move a finished temporary folder to `folder` (same file system); an existing one is swapped out,
    then removed, so that `folder` is always either the old complete folder or the new one."""
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """A temporary folder beside `folder` to fill; swapped in for `folder` when the block ends without an
    error, removed when it fails. What was written into it follows the umask (safetensors' `save_file` makes
    its files 0600 whatever the umask: shards, adapters and exports a group could not read)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    follow_umask(tmp, folder=True)
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if not path.is_symlink():
                follow_umask(path, folder=path.is_dir())
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep_partial_files(run_dir: Path) -> list[Path]:
    """Remove half-written files a crash can leave (the temporary names of the writers above)."""
    removed = []
    for pattern in PARTIAL_PATTERNS:
        for path in list(Path(run_dir).rglob(pattern)):
            if not path.exists():
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
