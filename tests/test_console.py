"""The console a person reads: progress lines, quiet start-up, the one-line config error."""

import importlib.util
import io
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from vitvq import console, quiet

REPO = pathlib.Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


FIELDS = (("loss/total", "loss", ".4f"), ("vq/codes_used", "codes", ".0f"))


def test_durations_and_numbers_read_well():
    assert [console.duration(s) for s in (4, 125, 3725)] == ["0:04", "2:05", "1:02:05"]
    assert console.duration(float("nan")) == "?" and console.duration(None) == "?"
    assert console.number(0.123456) == "0.1235" and console.number(float("nan")) == "nan"
    assert console.number(0.5721, ".1%") == "57.2%"
    assert console.rate_text(0.25) == "4.00 s/step" and console.rate_text(3.0) == "3.00 step/s"


def test_plain_lines_at_the_log_interval_when_not_a_terminal():
    out, clock = io.StringIO(), Clock()
    p = console.Progress("tokenizer", 300, fields=FIELDS, stream=out, clock=clock)
    assert not p.tty  # a StringIO is no terminal
    for step in range(1, 301):
        clock.now += 0.5
        metrics = {"loss/total": 1.0 / step, "vq/codes_used": 500.0} if step % 100 == 0 else None
        p.update(step, metrics)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    # step 100: 99 steps in 49.5 s since the first update -> 2 step/s, 200 steps left.
    assert lines[0] == "tokenizer 100/300  33%  2.00 step/s  ETA 1:40  loss 0.0100  codes 500"
    assert lines[2].startswith("tokenizer 300/300 100%") and "ETA 0:00" in lines[2]


def test_one_line_redrawn_in_place_on_a_terminal_with_events_above_it():
    out, clock = io.StringIO(), Clock()
    p = console.Progress("VIM", 10, fields=FIELDS, stream=out, tty=True, clock=clock)
    for step in range(1, 11):
        clock.now += 1.0
        p.update(step, {"loss/total": 2.0} if step == 5 else None)
        if step == 5:
            console.say("VIM eval @ 5: loss 2.0000", stream=out)
    p.close()
    text = out.getvalue()
    # Every draw starts by returning to the line start and clearing it; only the eval line
    # and the final newline end lines.
    assert text.count("\n") == 2 and text.endswith("\n")
    first, second = text.split("\n")[:2]
    assert first.endswith("VIM eval @ 5: loss 2.0000")
    assert second.split("\r\x1b[K")[-1].startswith("VIM 10/10 100%  1.00 step/s  ETA 0:00")
    assert "loss 2.0000" in second  # the last metrics stay on the line


def test_a_late_metrics_update_does_not_slow_the_rate():
    """The loop hands a step's metrics over after the eval that follows it."""
    out, clock = io.StringIO(), Clock()
    p = console.Progress("t", 4, fields=FIELDS, stream=out, clock=clock)
    for step in range(1, 5):
        clock.now += 1.0
        p.update(step)
    clock.now += 60.0  # a long evaluation
    p.update(4, {"loss/total": 0.5})
    assert out.getvalue().splitlines()[-1].startswith("t 4/4 100%  1.00 step/s")


def test_the_eval_line_shows_the_fields_present():
    fields = (("psnr", "PSNR", ".2f"), ("fid", "FID", ".2f"), ("codebook_usage", "usage", ".1%"))
    line = console.eval_line(500, {"psnr": 24.314, "codebook_usage": 0.5721, "l1": 3.0}, fields)
    assert line == "eval @ 500: PSNR 24.31  usage 57.2%"


@pytest.mark.parametrize(
    "environ, chips, gpu, libtpu, expected",
    [
        ({}, 0, False, True, "cpu"),  # libtpu, no TPU: skip the probe
        ({}, 4, False, True, None),  # a TPU VM (chips on the PCI bus): JAX finds its TPU
        ({}, 0, True, True, None),  # a GPU machine: JAX's own choice
        ({}, 0, False, False, None),  # no libtpu: nothing to quiet
        ({"JAX_PLATFORMS": "tpu"}, 0, False, True, None),  # the user's choice wins
        ({"JAX_FORCE_TPU_INIT": "1"}, 0, False, True, None),
        ({"TPU_LIBRARY_PATH": "/x/libtpu.so"}, 0, False, True, "cpu"),  # set by libtpu itself
    ],
)
def test_the_tpu_probe_is_skipped_only_without_a_tpu(environ, chips, gpu, libtpu, expected):
    got = quiet.platforms_to_use(environ, tpu_chips=chips, gpu_present=gpu, libtpu_installed=libtpu)
    assert got == expected


def _record(path: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("x", level, path, 1, message, None, None)


def test_the_orbax_filter_keeps_real_warnings_and_errors():
    f = quiet.OrbaxFilter()
    orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    notice = "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0."
    assert not f.filter(_record(orbax, logging.WARNING, notice))
    assert not f.filter(_record(orbax, logging.INFO, "Saving item to ..."))
    assert f.filter(_record(orbax, logging.WARNING, "Checkpoint step 3 could not be read"))
    assert f.filter(_record(orbax, logging.ERROR, "read_only failure"))
    assert f.filter(_record("/venv/site-packages/jax/x.py", logging.INFO, "read-only"))


def _command(*args, **env_changes):
    # A user's environment: none of the suite's platform, device or TensorFlow log settings.
    unset = ("JAX_PLATFORMS", "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(env_changes)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the test or tpu extra)"
)
def test_a_config_mistake_prints_exactly_its_error_line_with_libtpu_installed(tmp_path):
    """No TPU here and JAX_PLATFORMS unset, as on a laptop with the `tpu` extra: nothing of
    libtpu's probe, JAX, TensorFlow or our own start-up comes before the one error line. The
    mistake is one the trainer finds, after TensorFlow was imported (its import notices:
    vitvq.tf_notices)."""
    missing = tmp_path / "nonexistent"
    proc = _command(
        "vitvq.main",
        "--config=configs/vitvq_small.py:runlocal",
        f"--workdir={tmp_path / 'run'}",
        f"--config.init_from={missing}",
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: config.init_from={missing} does not exist"]


def test_verbosity_brings_the_log_lines_back(tmp_path):
    proc = _command(
        "vitvq.main",
        "--config=configs/demo.py",
        f"--workdir={tmp_path}",
        "--config.batch_size=-3",
        "--verbosity=1",
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[-1].startswith("error: config.batch_size=-3")
    assert any("process 0 of 1 (one process)" in line for line in lines[:-1])


def test_elapsed_draws_only_on_a_terminal():
    out = io.StringIO()
    with console.Elapsed("compiling", stream=out, tty=False):
        pass
    assert out.getvalue() == ""
    with console.Elapsed("compiling", stream=out, tty=True):
        pass
    assert out.getvalue().endswith("\r\x1b[Kcompiling 0:00\n")


def test_the_training_loop_prints_progress_and_eval_lines(capsys):
    """The loop with a stand-in step (no device work): plain progress lines at the log
    interval, one line per evaluation, and the after-eval hook (curves.png) at each."""
    import jax
    import numpy as np

    from vitvq import parallel
    from vitvq.train import loop

    class State:
        def __init__(self, step):
            self.step = np.int32(step)

    def step_fn(state, batch, step):
        loss = np.float32(1.0 / (step + 1))
        return State(step + 1), {"loss/total": loss, "nonfinite_steps": 0}

    def batches(start):
        while True:
            yield {"image": np.zeros((8, 1), np.float32)}

    class Checkpointer:
        def save(self, step, state, force=False):
            pass

        def reached_preemption(self, step):
            return False

        def wait(self):
            pass

    class Writer:
        def write_scalars(self, step, scalars):
            pass

        def flush(self):
            pass

    evaluated = []
    task = loop.Task(
        State(0),
        step_fn,
        batches,
        parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]),
        evaluate=lambda state: {"psnr": 20.0 + int(state.step), "l1": 0.5},
        title="tokenizer",
        progress_fields=(("loss/total", "loss", ".3f"),),
        eval_fields=(("psnr", "PSNR", ".2f"),),
        after_eval=evaluated.append,
    )
    settings = loop.LoopSettings(
        total_steps=10,
        log_every_steps=4,
        eval_every_steps=5,
        image_every_steps=100,
        checkpoint_every_steps=100,
        max_consecutive_nonfinite=2,
    )
    capsys.readouterr()
    loop.run(task, settings, Checkpointer(), Writer())
    lines = capsys.readouterr().out.splitlines()
    starts = (
        "tokenizer  4/10  40%",
        "tokenizer eval @ 5: PSNR 25.00",
        "tokenizer  8/10  80%",
        "tokenizer eval @ 10: PSNR 30.00",
        "tokenizer 10/10 100%",
    )
    assert len(lines) == len(starts), lines
    assert all(line.startswith(start) for line, start in zip(lines, starts, strict=True)), lines
    assert lines[0].endswith("loss 0.250") and "step/s" in lines[0] and "ETA" in lines[0]
    assert evaluated == [5, 10]
