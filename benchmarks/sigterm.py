"""Preemption: how long a training run takes from SIGTERM to a written checkpoint and exit.

    python benchmarks/sigterm.py --preset=demo|100m|tiny [--after_steps=N]

Starts `python -m vitvq.main` (JAX_PLATFORMS=cpu, a temporary workdir, one metrics row per
step) as a subprocess, waits until `metrics.jsonl` has the training metrics of step N or
later (training is under way and past its compiles; the loop fetches a step's metrics while
the next step runs), sends SIGTERM and waits for the process to exit. A
single-process run then finishes the step in flight, writes a checkpoint of that step, logs
"Preemption notice at step N: checkpoint written, exiting." and exits 0 (vitvq/preemption.py).

Presets:

- `demo`: configs/demo.py as it is (trainer "pipeline"; the signal arrives while its first
  phase trains the digits tokenizer, whose run is workdir/tokenizer; the time to exit includes
  whatever the pipeline does after the tokenizer's loop returns);
- `100m`: configs/vitvq_small.py:runlocal (digits, 32x32, batch 8) with the encoder and the
  decoder widened to ~102M generator parameters (width 704, depth 8, 11 heads, MLP 2816
  each), no perceptual loss, no eval, images or interval checkpoints before the signal: the
  only checkpoint is the SIGTERM one (~1.2 GB expected: parameters and Adam moments), and
  no LPIPS network loaded (`--config.eval_lpips=False`);
- `tiny`: configs/vitvq_small.py:runlocal with the loop settings of `100m`, no perceptual
  loss and no discriminator (it would start at step 1000000): a smoke test, ~30 s on two CPU
  cores where the discriminator and LPIPS in the step would double the compile.

The last stdout line is one JSON object: `sigterm_to_exit_seconds` (signal sent -> process
gone), `sigterm_to_checkpoint_log_seconds` (signal sent -> the log line above seen; polled
every 20 ms), `exit_code`, `checkpoint_step` (from the log line; the step directory
workdir/checkpoints/<step> must exist), `checkpoint_bytes` (that directory on disk),
`generator_params` (from the log line "generator parameters: X.XXM"), `signal_after_step`
(the last step whose training metrics were written before the signal), `median_step_seconds`
(the median of 1 / `steps_per_sec` of the progress rows clu's ReportProgress writes to
metrics.jsonl before the signal, the first one left out as it spans the compile; null without
such rows) and `startup_seconds` (process start -> first training metrics row). Progress goes
to stderr; `--keep_log=FILE` keeps the run's log; `--override=--config.KEY=VALUE` (repeatable)
adds overrides. The subprocess is killed on any failure (no metrics row for step N within
`--start_timeout`, no exit within `--exit_timeout`): then no JSON, exit status 1. The JSON is
printed whenever the run exited after the signal, with `problems` (a list, empty when all is
well); the status is 1 too if its exit code was not 0 or it wrote no checkpoint.
"""

import argparse
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

_QUIET_LOOP = [
    "--config.total_steps=1000000",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=1000000",
    "--config.image_every_steps=1000000",
    "--config.checkpoint_every_steps=1000000",
]
_WIDE = [
    f"--config.model.{part}.{key}={value}"
    for part in ("encoder", "decoder")
    for key, value in (("width", 704), ("depth", 8), ("num_heads", 11), ("mlp_dim", 2816))
]

# preset -> (config, overrides, run directory inside the workdir, default --after_steps)
PRESETS = {
    "demo": ("configs/demo.py", ["--config.log_every_steps=1"], "tokenizer", 20),
    "100m": (
        "configs/vitvq_small.py:runlocal",
        [*_WIDE, "--config.loss.perceptual=0.0", "--config.eval_lpips=False", *_QUIET_LOOP],
        ".",
        5,
    ),
    "tiny": (
        "configs/vitvq_small.py:runlocal",
        [
            "--config.loss.perceptual=0.0",
            "--config.eval_lpips=False",
            "--config.loss.disc_start_step=1000000",
            *_QUIET_LOOP,
        ],
        ".",
        3,
    ),
}

PREEMPTED = re.compile(r"Preemption notice at step (\d+): checkpoint written, exiting\.")
PARAMS = re.compile(r"generator parameters: ([0-9.]+)M")


def log(message: str) -> None:
    print(f"[sigterm] {message}", file=sys.stderr, flush=True)


def read_rows(path: pathlib.Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSON rows appended to `path` after byte `offset`; the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a row still being written waits for the next poll
    rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return rows, offset + end


def dir_bytes(path: pathlib.Path) -> int:
    return sum(
        os.path.getsize(os.path.join(parent, name))
        for parent, _, files in os.walk(path)
        for name in files
    )


def tail(path: pathlib.Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def measure(args, tmp: pathlib.Path) -> dict:
    config, overrides, run_dir, default_after = PRESETS[args.preset]
    after_steps = default_after if args.after_steps is None else args.after_steps
    workdir = tmp / "workdir"
    run = workdir / run_dir
    metrics_path = run / "metrics.jsonl"
    log_path = tmp / "run.log"
    command = [
        sys.executable,
        "-m",
        "vitvq.main",
        f"--config={REPO / config}",
        f"--workdir={workdir}",
        *overrides,
        *args.override,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log(f"starting: {' '.join(command[1:])}")
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed as one on failure
        )
    try:
        return _drive(args, proc, started, after_steps, metrics_path, log_path, run)
    finally:
        if proc.poll() is None:
            log(f"killing the run (pid {proc.pid})")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if args.keep_log:
            pathlib.Path(args.keep_log).write_bytes(log_path.read_bytes())


def _drive(args, proc, started, after_steps, metrics_path, log_path, run) -> dict:
    offset, rates, last_step, first_row_at = 0, [], None, None
    deadline = started + args.start_timeout
    # 1. Wait until a metrics row for step >= after_steps arrives.
    while last_step is None or last_step < after_steps:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the run exited with status {proc.returncode} before step {after_steps}:\n"
                + tail(log_path)
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"no metrics row for step {after_steps} within --start_timeout="
                f"{args.start_timeout} s:\n" + tail(log_path)
            )
        time.sleep(0.02)
        rows, offset = read_rows(metrics_path, offset)
        now = time.monotonic()
        for row in rows:
            if "steps_per_sec" in row:  # clu's progress report, over the steps since the last
                rates.append(row["steps_per_sec"])
            if not any(key.startswith("train/") for key in row):
                continue
            if first_row_at is None:
                first_row_at = now
                log(f"first metrics row (step {row['step']}) after {now - started:.1f} s")
            last_step = row["step"]

    # 2. SIGTERM; note when the checkpoint log line appears and when the process is gone.
    log(f"metrics row for step {last_step}: sending SIGTERM to pid {proc.pid}")
    signalled = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    checkpoint_log_at = None
    while proc.poll() is None:
        now = time.monotonic()
        if now - signalled > args.exit_timeout:
            raise RuntimeError(
                f"the run did not exit within --exit_timeout={args.exit_timeout} s of SIGTERM:\n"
                + tail(log_path)
            )
        if checkpoint_log_at is None and PREEMPTED.search(log_path.read_text(errors="replace")):
            checkpoint_log_at = now
        time.sleep(0.02)
    exited = time.monotonic()
    text = log_path.read_text(errors="replace")
    if checkpoint_log_at is None and PREEMPTED.search(text):
        checkpoint_log_at = exited  # appeared between the last poll and the exit
    log(f"exited with status {proc.returncode} {exited - signalled:.2f} s after SIGTERM")

    problems = []
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}")
    preempted = PREEMPTED.search(text)
    step, checkpoint_bytes = None, None
    if preempted is None:
        problems.append("no 'Preemption notice at step N: checkpoint written' line in the log")
    else:
        step = int(preempted.group(1))
        checkpoint = run / "checkpoints" / str(step)
        if checkpoint.is_dir():
            checkpoint_bytes = dir_bytes(checkpoint)
        else:
            problems.append(f"the log names step {step} but {checkpoint} does not exist")
    if problems:
        log("problems: " + "; ".join(problems) + "; the run's log ends:\n" + tail(log_path))
    params = PARAMS.search(text)
    step_seconds = [1.0 / r for r in rates[1:] if r > 0]  # the first report spans the compile
    return {
        "benchmark": "sigterm",
        "preset": args.preset,
        "platform": "cpu",
        "sigterm_to_exit_seconds": round(exited - signalled, 3),
        "sigterm_to_checkpoint_log_seconds": (
            round(checkpoint_log_at - signalled, 3) if checkpoint_log_at is not None else None
        ),
        "exit_code": proc.returncode,
        "checkpoint_step": step,
        "checkpoint_bytes": checkpoint_bytes,
        "generator_params": round(float(params.group(1)) * 1e6) if params else None,
        "signal_after_step": last_step,
        "median_step_seconds": (
            round(statistics.median(step_seconds), 4) if step_seconds else None
        ),
        "startup_seconds": round(first_row_at - started, 2),
        "problems": problems,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument(
        "--after_steps",
        type=int,
        default=None,
        help="send SIGTERM once metrics.jsonl has a row for this step (default: per preset)",
    )
    parser.add_argument("--start_timeout", type=float, default=1800.0, help="seconds")
    parser.add_argument("--exit_timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--keep_log", default=None, help="copy the run's log to this file")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra --config.KEY=VALUE for the run (repeatable)",
    )
    args = parser.parse_args()
    if args.after_steps is not None and args.after_steps < 1:
        parser.error("--after_steps must be at least 1")
    with tempfile.TemporaryDirectory(prefix="vitvq_sigterm_") as tmp:
        try:
            result = measure(args, pathlib.Path(tmp))
        except RuntimeError as e:
            log(f"failed: {e}")
            sys.exit(1)
    print(json.dumps(result))
    if result["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
