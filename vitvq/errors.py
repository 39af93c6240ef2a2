"""The project's error classes.

A user mistake (bad config value, missing data, bad bundle, bad image, bad CLI argument)
raises one of these with a message that says what was wrong and what to do. CLIs print the
message without a traceback and exit with status 2 (see `vitvq.cli.user_errors`).
"""

from collections.abc import Callable


def caused_by(error: BaseException | None, test: Callable[[BaseException], bool]) -> bool:
    """Whether `test` holds for `error` or any exception it was raised from or during
    (`__cause__`, else `__context__`), each looked at once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if test(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class VitvqError(Exception):
    """Base class of every error caused by user input."""


class ConfigError(VitvqError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class InputError(VitvqError, ValueError):
    """An array given to a model or function has the wrong shape, dtype or values."""


class DataError(VitvqError):
    """A dataset or data file is missing or unreadable."""


class BundleError(VitvqError):
    """An exported bundle is missing, corrupt or of an unsupported version."""


class StorageError(VitvqError):
    """A checkpoint or output file could not be written (disk full, no permission, quota)."""
