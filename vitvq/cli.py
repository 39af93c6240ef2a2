"""Small helpers shared by the command-line tools: one-line errors and exit status 2.

A user mistake (a bad flag, a missing file, a corrupt bundle) prints one `error: ...` line on
stderr, no traceback, and exits with status 2.

With absl's global flags and `app.run`:

    def main(argv):
        no_extra_args(argv)
        with user_errors():
            ...

    app.run(main, flags_parser=parse_flags)

A tool whose flag names clash with another tool's (e.g. --output) can define them in a
private `flags.FlagValues` instead (see vitvq/reconstruct.py), so that both can be imported
in one process and its `main` can be called repeatedly, as tests do.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from absl import flags

from vitvq.errors import VitvqError

EXIT_USER_ERROR = 2


def one_line(error: BaseException | str) -> str:
    """An error message on one line; a multi-line one keeps its first and last lines."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1:
        return f"{lines[0]} {lines[-1]}"
    if lines:
        return lines[0]
    return type(error).__name__ if isinstance(error, BaseException) else "unknown error"


def exit_with(message: BaseException | str, status: int = EXIT_USER_ERROR) -> NoReturn:
    """Prints `error: MESSAGE` (one line) on stderr and exits with `status`."""
    sys.stdout.flush()
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(status)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns a VitvqError raised inside the block into one error line and exit status 2."""
    try:
        yield
    except VitvqError as err:
        exit_with(err)


def no_extra_args(argv: Sequence[str]) -> None:
    """Exits with one error line when positional arguments follow the program name."""
    if len(argv) > 1:
        exit_with(f"unexpected arguments {list(argv[1:])} (flags are written --name=value)")


def require_flags(*names: str) -> None:
    """Exits with one error line naming the first of absl's global flags that is unset."""
    for name in names:
        if not flags.FLAGS[name].value:
            exit_with(f"--{name} is required")


def parse_flags(argv: Sequence[str]) -> list[str]:
    """`app.run`'s flags_parser for absl's global FLAGS: a bad flag is one line, exit 2."""
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as err:
        exit_with(err)


def dataset_config(name: str, **kwargs) -> dict:
    """The `dataset` block `vitvq.data` reads, for a source named on the command line."""
    return {
        "name": name,
        "path": kwargs.get("path"),
        "tfds_name": kwargs.get("tfds_name", "imagenet2012"),
        "data_dir": kwargs.get("data_dir"),
        "train_split": "train",
        "eval_split": kwargs.get("split", "validation"),
        "num_classes": 0,
    }
