"""Errors that name the problem and the fix, raised before any weight loads where possible."""


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the option and how to fix it."""


class DataError(ValueError):
    """A data record or file that cannot be used; the message names the file and record index."""


class WriteFailed(RuntimeError):
    """A checkpoint, adapter, export or metrics file could not be written (a full disk, a quota); the message
    names the path and the free space, and the previous file (or folder) is kept."""

    exit_code = 5
