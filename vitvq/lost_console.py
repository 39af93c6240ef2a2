"""A training run outlives its console.

A run's output often goes through a pipe: `launch/local_pod.sh` prefixes each process's lines,
users add `| tee run.log`. When the reader of that pipe dies first (a SIGTERM to the whole
process group, as SLURM and Ctrl-C deliver it, reaches `tee` too), the next line the run
prints raises BrokenPipeError, and a long run would die of it: in a multi-process run
between its preemption checkpoint and its exit, or in the middle of training.

Within `outlived()`, the first write to a closed stdout or stderr points that file descriptor
at /dev/null instead; the run goes on, saves, and exits as it would have, its metrics and
checkpoints in the workdir. Nothing changes while the console is there.
"""

import contextlib
import os
import sys
from typing import TextIO


def _silence(stream: TextIO) -> None:
    """Points `stream`'s file descriptor at /dev/null: what this process prints from now on
    (Python, the libraries' C++ logs, the interpreter's last flush) goes nowhere."""
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):  # no file descriptor (a test's capture)
        return
    os.dup2(null, fd)
    os.close(null)


class _Outliving:
    """`stream`, except that a write or flush into a closed pipe silences it (see above)."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _silence(self._stream)
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            _silence(self._stream)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def outlived():
    """Within the block, sys.stdout and sys.stderr survive a closed pipe (see the module
    docstring); they are put back at the end."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Outliving(sys.stdout), _Outliving(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
