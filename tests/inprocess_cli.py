"""Running a command-line module's entry point inside the pytest process, as
`python -m MODULE ARGS...` would run it, without the cost of a new process (a new Python
importing JAX and the project again: 1.5-5 s each on a 2-core machine, more when it is busy).

    result = run_module_main(capfd, "vitvq.main", ["--config=...", ...], cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr

`run_module_main` runs what the module's `if __name__ == "__main__":` block runs (see
`ENTRY_POINTS`) with `sys.argv = [the module's file, *ARGS]`, in `cwd`, with the given
environment variables set and those with the given prefixes unset. What a process would show:

- its exit status: `sys.exit`'s code (None is 0; a message is printed and is 1), and an
  uncaught exception is printed as a traceback on stderr with status 1, as Python does;
- everything it writes to file descriptors 1 and 2 (pytest's `capfd`), absl's log handler
  included (pointed at the captured stderr for the run).

A fresh process starts with absl's flags unparsed at their defaults and `absl.app` not yet
initialized; each run starts so, and afterwards everything the run changed is put back:
absl's flags (values, parsed state, flags defined during the run such as ml_collections'
`--config.KEY` overrides and absl's --help flags), `absl.app`'s one-time initialization, the
root logger's level, handlers and their filters, absl's logger and handler, the environment,
the current directory, `sys.argv`, JAX's config values and the module state of
`vitvq.distributed` and `vitvq.peer_watchdog` (what importing JAX sets up once per process is
done before, and stays). Two process-wide effects of `absl.app.run` are skipped, not undone:
renaming the process after `sys.argv[0]` and pointing `faulthandler` at the (captured, soon
closed) stderr.

Only for runs that stop early (user errors): a run that trains or starts JAX's
distributed runtime belongs in a subprocess. (absl's --help prints the docstring of
`__main__`, here pytest's.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence

import pytest


@dataclasses.dataclass(frozen=True)
class Result:
    """What `subprocess.run(..., capture_output=True, text=True)` would have returned."""

    returncode: int
    stdout: str
    stderr: str


def _absl_app_run(module_name: str, parser_name: str) -> Callable[[], None]:
    def run() -> None:
        from absl import app

        module = importlib.import_module(module_name)
        app.run(module.main, flags_parser=getattr(module, parser_name))

    return run


def _sys_exit_main(module_name: str) -> Callable[[], None]:
    def run() -> None:
        sys.exit(importlib.import_module(module_name).main())

    return run


# What each module's `if __name__ == "__main__":` block runs.
ENTRY_POINTS: dict[str, Callable[[], None]] = {
    "vitvq.main": _absl_app_run("vitvq.main", "_parse_flags"),  # app.run(main, _parse_flags)
    "vitvq.aot": _sys_exit_main("vitvq.aot"),  # sys.exit(main())
}


def _exit_status(code, stderr) -> int:
    """The status a process exits with after `sys.exit(code)`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=stderr)
    return 1


@contextlib.contextmanager
def _absl_state_restored() -> Iterator[None]:
    """absl's flags and `app.run`'s one-time set-up as a fresh process has them; afterwards
    as they were."""
    from absl import app, flags

    fv = flags.FLAGS
    saved_flags = {name: dict(fv[name].__dict__) for name in fv}
    saved_parsed = {key: fv.__dict__[key] for key in ("__flags_parsed", "__unparse_flags_called")}
    saved_app = (
        app._run_init.done,
        app._register_and_parse_flags_with_usage.done,
        app._define_help_flags_called,
    )
    fv.unparse_flags()
    app._run_init.done = False
    app._register_and_parse_flags_with_usage.done = False
    try:
        yield
    finally:
        for name in list(fv):
            if name not in saved_flags:  # e.g. --config.batch_size, --help
                delattr(fv, name)
        for name, state in saved_flags.items():
            flag = fv[name]
            flag.__dict__.clear()
            flag.__dict__.update(state)
        fv.__dict__.update(saved_parsed)
        (
            app._run_init.done,
            app._register_and_parse_flags_with_usage.done,
            app._define_help_flags_called,
        ) = saved_app


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """The root logger, absl's logger and handler as they were; absl's handler writes to the
    stderr of the run (in a process it writes to the process's stderr)."""
    from absl import logging as absl_logging

    root = logging.getLogger()
    absl_logger = logging.getLogger("absl")
    absl_handler = absl_logging.get_absl_handler()
    handlers = list(root.handlers)
    filters = {h: list(h.filters) for h in {*handlers, absl_handler}}
    levels = (root.level, absl_logger.level)
    module_state = {
        name: getattr(absl_logging, name)
        for name in ("_attempted_to_remove_stderr_stream_handlers", "_warn_preinit_stderr")
    }
    stream = absl_handler.python_handler.stream
    absl_handler.python_handler.stream = sys.stderr
    try:
        yield
    finally:
        absl_handler.python_handler.stream = stream
        for name, value in module_state.items():
            setattr(absl_logging, name, value)
        root.handlers[:] = handlers
        for handler, kept in filters.items():
            handler.filters[:] = kept
        root.setLevel(levels[0])
        absl_logger.setLevel(levels[1])


@contextlib.contextmanager
def _environ_restored() -> Iterator[None]:
    """os.environ as it was, whatever the run set or removed."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for name in [name for name in os.environ if name not in saved]:
            del os.environ[name]
        for name, value in saved.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


@contextlib.contextmanager
def _jax_and_vitvq_state_restored() -> Iterator[None]:
    """JAX's config values and vitvq.distributed's and vitvq.peer_watchdog's module state as
    they were."""
    import jax

    from vitvq import distributed, peer_watchdog

    config = dict(jax.config.values)
    states = [(module._state, dict(module._state)) for module in (distributed, peer_watchdog)]
    try:
        yield
    finally:
        for state, saved in states:
            state.clear()
            state.update(saved)
        for name, value in config.items():
            if jax.config.values.get(name) is not value and jax.config.values.get(name) != value:
                jax.config.update(name, value)


def run_module_main(
    capfd: pytest.CaptureFixture,
    module: str,
    args: Sequence[str],
    *,
    cwd: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    unset_env_prefixes: Sequence[str] = (),
) -> Result:
    """`python -m MODULE ARGS...` in this process (see the module docstring): its exit
    status and what it wrote to stdout and stderr."""
    # Importing JAX sets variables for the rest of the process (TPU_LIBRARY_PATH,
    # TPU_SKIP_MDS_QUERY: without it a later libtpu start queries the TPU metadata server);
    # as in a process, they stay: imported before the environment is saved.
    import jax  # noqa: F401
    from absl import app

    entry_point = ENTRY_POINTS[module]
    prog = importlib.import_module(module).__file__
    sys.stdout.flush()
    sys.stderr.flush()
    capfd.readouterr()  # what came before is not the run's output
    with contextlib.ExitStack() as stack:
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        stack.enter_context(_environ_restored())
        for name in list(os.environ):
            if name.startswith(tuple(unset_env_prefixes)):
                mp.delenv(name)
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        mp.chdir(cwd)
        mp.setattr(sys, "argv", [prog, *args])
        # Process-wide effects of absl.app.run that a test process must not take on.
        mp.setattr(app.command_name, "make_process_name_useful", lambda: None)
        mp.setattr(app, "faulthandler", None)
        stack.enter_context(_jax_and_vitvq_state_restored())
        stack.enter_context(_logging_restored())
        stack.enter_context(_absl_state_restored())
        try:
            entry_point()
            status = 0
        except SystemExit as exit_:
            status = _exit_status(exit_.code, sys.stderr)
        except Exception:  # what Python prints for an uncaught exception, and status 1
            traceback.print_exc(file=sys.stderr)
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    out, err = capfd.readouterr()
    return Result(status, out, err)
