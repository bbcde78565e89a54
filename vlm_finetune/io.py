"""Files and folders that are either whole or absent: every writer in the package goes through here, so that a
crash, a kill or a full disk leaves the previous file (or folder) or the new one, never half of one."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from vlm_finetune.errors import WriteFailed

# a write that fails for want of space: the OS's errors, and what the libraries make of them (torch's zip writer
# says only "unexpected pos"; safetensors names the OS error in its text)
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
FULL_BELOW_BYTES = 1 << 20  # a disk with less free than this when a write fails is taken to be what failed it

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


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing folder); -1 if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def out_of_space(err: BaseException, path: Path) -> WriteFailed | None:
    """A WriteFailed naming `path` and the free space when `err` came from a full disk or a quota, else None."""
    free = free_bytes(Path(path).parent)
    said = getattr(err, "errno", None) in NO_SPACE_ERRNOS or any(text in str(err) for text in NO_SPACE_TEXTS)
    if not (said or (isinstance(err, (OSError, RuntimeError)) and 0 <= free < FULL_BELOW_BYTES)):
        return None
    where = f"{free / 2**20:.1f} MiB free there" if free >= 0 else "free space unknown"
    return WriteFailed(f"cannot write {path}: its disk is full or over quota ({where}; {type(err).__name__}: "
                       f"{str(err).strip()[:200]}). The previous {Path(path).name}, if any, is kept whole. Free some "
                       "space there (or point the run at a roomier disk) and rerun the same command")


@contextlib.contextmanager
def atomic_path(path: Path, ext: str = "") -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (matplotlib, torch, safetensors);
    renamed over `path` when the block ends without an error, removed when it fails. `ext` ends the
    temporary name for writers that pick the format from it (matplotlib: ".png")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp" + ext, dir=path.parent)
    except OSError as err:  # no inode left, a quota
        raise (out_of_space(err, path) or err) from err
    os.close(fd)
    follow_umask(Path(tmp))
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as err:
        if os.path.exists(tmp):
            os.unlink(tmp)  # before the free space is measured: the half-written file is not what is left
        failed = out_of_space(err, path)
        if failed is not None:
            raise failed from err
        raise
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
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = out_of_space(err, folder)
        if failed is not None:
            raise failed from err
        raise
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
