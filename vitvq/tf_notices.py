"""TensorFlow's start-up notices stay off the console.

Importing TensorFlow prints, from C++ and before any Python logging is set up, a notice that
oneDNN's custom operations are on, preceded by absl's "All log messages before
absl::InitializeLog() is called are written to STDERR" (twice: two of TensorFlow's libraries
log it), and on some machines which CPU instructions the binary could use. They ignore
`TF_CPP_MIN_LOG_LEVEL`, and a user met four of these lines before the first line of the run,
or before a config mistake's one error line.

`quiet_tensorflow_import()` (called by `vitvq.quiet.startup`) arranges that the first
`import tensorflow`, wherever it happens, runs with file descriptor 2 captured; afterwards
every captured line goes to the real stderr except those notices. Nothing else changes: later
TensorFlow warnings and errors print as before, and `--verbosity=1` keeps the notices.
"""

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile

NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)


@contextlib.contextmanager
def notices_dropped(notices=NOTICES):
    """Within the block, what is written to file descriptor 2 (by Python or C++) is held
    back; at its end, every line but those containing one of `notices` is written out."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not any(n in line for n in notices))
            if kept:
                os.write(2, kept.encode())


class _QuietLoader(importlib.abc.Loader):
    """The package's own loader, its module run within `notices_dropped`."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with notices_dropped():
            self._loader.exec_module(module)

    def __getattr__(self, name):  # get_data, is_package, resource readers: the real loader's
        return getattr(self._loader, name)


class _FirstImport(importlib.abc.MetaPathFinder):
    """Finds package `name` once (then leaves `sys.meta_path`), with a `_QuietLoader`."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_first_import(name: str) -> None:
    """The first import of package `name` (not imported yet) drops the notices (see above)."""
    if name in sys.modules or any(
        isinstance(f, _FirstImport) and f.name == name for f in sys.meta_path
    ):
        return
    sys.meta_path.insert(0, _FirstImport(name))


def quiet_tensorflow_import() -> None:
    quiet_first_import("tensorflow")
