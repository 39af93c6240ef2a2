"""Running a command-line module of the package in a fresh process, as a user would."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS...` from the repository root on the CPU; output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=REPO,
        timeout=timeout,
    )
