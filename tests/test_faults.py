"""Real faults injected into real training runs (`python -m vitvq.main` subprocesses):

- SIGKILL at several moments, one of them while an asynchronous checkpoint is being
  written: each restart with the same command resumes from the last committed checkpoint
  (never a partial one), and the finished run's final state equals an uninterrupted run's,
  bit for bit. The uninterrupted run is made twice: same config and seed, identical states.
- SIGTERM, to a restart in the same chain: the run checkpoints the step in flight and exits
  0 within a bound; the next restart continues from exactly that step, logs each step after
  it once, and still ends bit-identical.
- An unwritable workdir is a one-line error at start; a disk that fills up (a file-size
  limit: the kernel refuses writes with EFBIG) is a one-line error at save time, and the
  previous checkpoint stays valid.
- A workdir whose checkpoint was written by another config (other widths, codebook size) is
  a one-line error naming the parameters whose shapes differ.
- A committed checkpoint damaged afterwards (a flipped byte): the restart names it, resumes
  from the previous one and ends bit-identical; with every checkpoint damaged, training and
  export stop with one line (tests/test_damaged_checkpoints.py covers each kind of damage).
- The suite's persistent compilation cache never changes a result: of the two uninterrupted
  runs one has the cache switched off, and the last restart of the SIGKILL test, whose
  programs come from the cache (its log shows the hits), ends bit-identical to that one.

Subprocesses use the suite's persistent compilation cache (tests/conftest.py) and LLVM's
cheapest optimization level.
"""

import json
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import repair_compilation_cache
from workdir_helpers import resume_point

from vitvq.checkpoint import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"--config={REPO / 'configs' / 'vitvq_small.py'}:runlocal"
TOTAL = 40
LOG_EVERY = 4
ARGS = [
    CONFIG,
    f"--config.total_steps={TOTAL}",
    "--config.checkpoint_every_steps=4",
    f"--config.log_every_steps={LOG_EVERY}",
    f"--config.eval_every_steps={TOTAL}",
    f"--config.image_every_steps={TOTAL}",
    "--config.loss.perceptual=0.0",
    "--config.eval_lpips=False",
    "--config.loss.r1_gamma=0.0",  # one compiled step, not two
    # Wider than runlocal so that a checkpoint write lasts long enough to be caught.
    "--config.model.encoder.width=128",
    "--config.model.decoder.width=128",
]
SIGTERM_BOUND = 60  # seconds from SIGTERM to exit: a step, a checkpoint, shutdown, slack
TIMEOUT = 600


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("VITVQ_", "SLURM_"))}
    environment.update(
        XLA_FLAGS="--xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    return environment


def _argv(workdir, extra):
    return [sys.executable, "-m", "vitvq.main", *ARGS, *extra, f"--workdir={workdir}"]


def start(env, workdir, *extra) -> subprocess.Popen:
    """A run in the background, its output appended to WORKDIR.log (one per restart)."""
    log = open(f"{workdir}.log", "a")
    return subprocess.Popen(
        _argv(workdir, extra), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def run(env, workdir, *extra, preexec_fn=None) -> tuple[int, str]:
    """A run to its end: (exit status, output). The output goes through a pipe, which a
    file-size limit set by `preexec_fn` does not cut short."""
    proc = subprocess.run(
        _argv(workdir, extra),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
        preexec_fn=preexec_fn,
    )
    return proc.returncode, proc.stdout


def committed_steps(workdir) -> list[int]:
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def partial_writes(workdir) -> list[str]:
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.exists():
        return []
    return [p.name for p in directory.iterdir() if "tmp" in p.name]


def final_state(workdir, step: int = TOTAL):
    with Checkpointer(
        pathlib.Path(workdir) / "checkpoints", save_every_steps=1, read_only=True
    ) as ckpt:
        tree, saved = ckpt.restore_as_saved(step)
    assert saved == step
    return jax.tree_util.tree_map(np.asarray, tree)


def assert_bitwise_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x, y, equal_nan=True), jax.tree_util.keystr(path)


def error_line(log: str) -> str:
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    return errors[0]


def wait_for(condition, proc, timeout=TIMEOUT, poll=0.002):
    """Polls `condition()` until true; False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(poll)
    raise TimeoutError("condition not reached")


# A run with no persistent compilation cache: it compiles every program itself.
NO_CACHE = {"JAX_ENABLE_COMPILATION_CACHE": "false"}
# JAX logs each program it loads from the persistent cache ("Persistent compilation cache hit
# for 'jit_NAME'") when it logs compiles.
CACHE_HITS = {"JAX_LOG_COMPILES": "1"}


def cache_hits(log: str) -> list[str]:
    """The names of the programs a run loaded from the persistent compilation cache."""
    return re.findall(r"Persistent compilation cache hit for '([^']+)'", log)


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    """Two uninterrupted runs of the same config and seed, side by side: run0 without the
    persistent compilation cache (the reference every bit-identical check compares with),
    run1 with it."""
    if env.get("JAX_ENABLE_COMPILATION_CACHE") == "false":
        pytest.skip("the suite runs without a persistent compilation cache")
    root = tmp_path_factory.mktemp("straight")
    procs = [start({**env, **NO_CACHE}, root / "run0"), start(env, root / "run1")]
    for k, proc in enumerate(procs):
        assert proc.wait(timeout=TIMEOUT) == 0, (root / f"run{k}.log").read_text()[-3000:]
    return [final_state(root / f"run{k}") for k in range(2)], root / "run0"


def test_same_config_and_seed_give_bit_identical_states(uninterrupted):
    (first, second), _ = uninterrupted
    assert_bitwise_equal(first, second)


def test_sigkill_at_random_moments_and_sigterm_then_restart_finishes_identically(
    env, uninterrupted, tmp_path
):
    workdir = tmp_path / "killed"
    rng = np.random.default_rng(0)
    kills = []  # (partial writes left, exit status, resume point) after each kill

    def kill(proc):
        proc.kill()
        proc.wait(timeout=60)
        kills.append((partial_writes(workdir), proc.returncode, resume_point(workdir)))
        if cache := os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            # killed between JAX's two writes of a cache entry, it would stop the cache growing
            repair_compilation_cache(cache)

    def trains_past_its_start(proc):
        """Once the restart `proc` has committed a checkpoint of its own."""
        before = max(committed_steps(workdir), default=0)
        wait_for(lambda: max(committed_steps(workdir), default=0) > before, proc)

    # Kill while an asynchronous checkpoint is being written: as soon as orbax's temporary
    # directory appears. The write may still win the race and commit first: try again (each
    # restart resumes and writes the next checkpoint), up to three times.
    for _ in range(3):
        proc = start(env, workdir)
        caught = wait_for(lambda: partial_writes(workdir), proc)
        assert caught, "the run ended before a checkpoint write could be caught"
        kill(proc)
        if kills[-1][0]:
            break
    assert kills[-1][0], "no kill landed while a checkpoint was being written"
    # Then at random moments, once a restart has trained a little further.
    for _ in range(2):
        proc = start(env, workdir)
        trains_past_its_start(proc)
        time.sleep(rng.uniform(0.0, 0.5))
        kill(proc)
    assert all(rc == -signal.SIGKILL for _, rc, _ in kills if rc != 0)

    # SIGTERM (a preemption notice): the restart checkpoints the step in flight and exits 0
    # within the bound, leaving no partial write.
    proc = start(env, workdir)
    trains_past_its_start(proc)
    time.sleep(0.3)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=SIGTERM_BOUND)
    took = time.time() - sent
    log = pathlib.Path(f"{workdir}.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert took < SIGTERM_BOUND
    (preempted,) = map(int, re.findall(r"Preemption notice at step (\d+): checkpoint written", log))
    assert preempted < TOTAL, "the run ended before the notice"
    assert committed_steps(workdir)[-1] == preempted
    assert not partial_writes(workdir)

    # The same command, to the end; its programs come from the cache the restarts wrote.
    metrics = workdir / "metrics.jsonl"
    rows_before = len(metrics.read_text().splitlines())
    rc, log = run({**env, **CACHE_HITS}, workdir)
    assert rc == 0, log[-3000:]
    hits = cache_hits(log)
    assert any("train_step" in name for name in hits), (hits, log[-3000:])
    # It continued from exactly the preempted step and logged each step after it once.
    assert f"Resumed from the checkpoint of step {preempted} in" in log
    rows = [json.loads(line) for line in metrics.read_text().splitlines()[rows_before:]]
    trained = [r["step"] for r in rows if "train/loss/total" in r]
    assert trained == [s for s in range(preempted + 1, TOTAL + 1) if s % LOG_EVERY == 0]
    logs = pathlib.Path(f"{workdir}.log").read_text() + log  # the killed attempts, the last
    resumed = [int(s) for s in re.findall(r"Resumed from the checkpoint of step (\d+)", logs)]
    # Every restart after a kill resumed from the newest committed step with its digest record
    # (a kill between orbax's commit and the record loses that step: the restart sets it
    # aside), never a partial one; a restart after a kill that left nothing committed starts
    # afresh.
    assert resumed == [point for *_, point in kills if point is not None] + [preempted]
    assert not partial_writes(workdir)
    # Served from the cache, bit-identical to run0, which compiled everything itself.
    assert_bitwise_equal(final_state(workdir), uninterrupted[0][0])


def test_unwritable_workdir_is_a_clear_error_at_start(env, tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: a regular file where the workdir's parent should be
        # is a workdir no one can create.
        parent = tmp_path / "file"
        parent.write_text("")
    else:
        parent = tmp_path / "readonly"
        parent.mkdir()
        parent.chmod(0o500)
    rc, log = run(env, parent / "run")
    assert "Compiling" not in log and "M parameters on" not in log  # before building
    assert rc == 2, log[-3000:]
    line = error_line(log)
    assert "workdir" in line and str(parent / "run") in line


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _copy_of_finished_run(uninterrupted, workdir):
    """A copy of an uninterrupted run's workdir (checkpoints of steps TOTAL-8..TOTAL)."""
    shutil.copytree(uninterrupted[1], workdir)
    return workdir


def test_disk_full_at_save_time_keeps_the_previous_checkpoint(env, uninterrupted, tmp_path):
    workdir = _copy_of_finished_run(uninterrupted, tmp_path / "full")
    before = committed_steps(workdir)
    # The resumed run may not write files over 256 KiB: the checkpoint's data files are
    # bigger (300-450 KiB), its metrics and events files smaller.
    rc, log = run(
        env,
        workdir,
        f"--config.total_steps={TOTAL + 4}",
        preexec_fn=_limit_file_size(256 * 1024),
    )
    assert rc == 2, log[-3000:]
    # One line from vitvq; orbax's background threads may add their own tracebacks.
    (line,) = [line for line in log.splitlines() if line.startswith("error: ")]
    assert f"cannot write the checkpoint of step {TOTAL + 4}" in line, line
    assert "File too large" in line and "are intact" in line, line
    # The newest checkpoint stays (orbax may already have retired the oldest of the three
    # it keeps when the new save started).
    assert committed_steps(workdir)[-1] == TOTAL and set(committed_steps(workdir)) <= set(before)
    assert_bitwise_equal(final_state(workdir, TOTAL), uninterrupted[0][0])


def test_checkpoint_of_another_config_names_the_differing_shapes(env, uninterrupted, tmp_path):
    workdir = _copy_of_finished_run(uninterrupted, tmp_path / "changed")
    rc, log = run(
        env, workdir, f"--config.total_steps={TOTAL + 4}", "--config.model.codebook_size=32"
    )
    assert rc == 2, log[-3000:]
    error_line(log)
    message = log[log.index("error: ") :]
    assert "does not match the train state" in message, message
    assert re.search(r"codebook\S*: checkpoint shape \(64, 8\) != state shape \(32, 8\)", message)


def _flip_largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01
    victim.write_bytes(bytes(data))
    return victim


def test_damaged_newest_checkpoint_resumes_from_the_previous_and_ends_identically(
    env, uninterrupted, tmp_path
):
    workdir = _copy_of_finished_run(uninterrupted, tmp_path / "damaged")
    steps = committed_steps(workdir)
    assert steps[-1] == TOTAL and len(steps) >= 2
    _flip_largest_data_file(workdir / "checkpoints" / str(TOTAL))
    rc, log = run(env, workdir)
    assert rc == 0, log[-3000:]
    assert f"Checkpoint step {TOTAL} in " in log and "sha256 mismatch" in log, log[-3000:]
    assert f"resuming from step {steps[-2]}, the newest intact checkpoint" in log, log[-3000:]
    assert (workdir / "damaged_checkpoints" / str(TOTAL)).is_dir()
    assert_bitwise_equal(final_state(workdir), uninterrupted[0][0])


def test_no_intact_checkpoint_stops_training_and_export_with_one_line(env, uninterrupted, tmp_path):
    workdir = _copy_of_finished_run(uninterrupted, tmp_path / "ruined")
    for step in committed_steps(workdir):
        _flip_largest_data_file(workdir / "checkpoints" / str(step))
    rc, log = run(env, workdir, f"--config.total_steps={TOTAL + 4}")
    assert rc == 2, log[-3000:]
    line = error_line(log)
    assert "every checkpoint in" in line and "--config.restart_from_scratch=True" in line, line
    assert not (workdir / "damaged_checkpoints").exists()  # nothing moved, nothing trained
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitvq.export",
            f"--workdir={workdir}",
            f"--output={tmp_path / 'b'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"checkpoint step {TOTAL}" in line, line
    assert "none is intact" in line and "--step=N" in line, line
