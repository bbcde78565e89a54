"""Errors that name the problem and the fix, raised before any weight loads where possible."""


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the option and how to fix it."""


class DataError(ValueError):
    """A data record or file that cannot be used; the message names the file and record index."""
