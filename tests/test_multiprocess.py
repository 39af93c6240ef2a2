"""Multi-process training on localhost: real JAX processes (gloo collectives, 2 fake CPU
devices each) started by `launch/local_pod.sh` or directly, as users run them.

- A 2-process x 2-device run of the runlocal stage-1 and stage-2 configs (the full loss:
  LPIPS and the GAN) logs the same losses at every step as a 1-process x 4-device run with
  the same global batch, and evaluates the same; process 0 alone writes the metrics, config
  and images.
- Everything else runs a cheap stage-1 config (no LPIPS, no GAN, `CHEAP_TOTAL` steps) and
  shares one uninterrupted pod as its reference, the pod that resumed a 1-process run's
  checkpoint of step 8:
  - checkpoints cross over: that pod's resumed steps repeat the 1-process run's losses, and
    a 1-process run resuming the pod's checkpoint repeats both;
  - every host preempted: SIGTERM to the whole process group of `local_pod.sh 2` (launcher,
    output prefixers, both processes), once while the processes start, before JAX's runtime
    has (they record it and hand it to JAX's preemption service), and once in a later launch
    while a checkpoint is being written: each time they agree on a step, checkpoint it and
    exit 0, their lines intact; the next launch resumes there;
  - a host lost, the pod relaunched: one process SIGKILLed three times over (mid-save, then at
    random moments; both processes are victims at least once), the survivor prints one
    `error:` line naming what happened (a silent worker, the lost coordinator) and exits with
    `peer_watchdog.PEER_FAILURE_EXIT_CODE` within a bounded time, without help from a launcher;
    each relaunch resumes from the newest committed checkpoint;
  - the preempted command, run again, ends with the reference pod's state, bit for bit.
  The preemption and the kills are launches of one workdir, one after the other.
- JAX's own abort on a dead peer becomes the same line and exit status.

Compilation dominates on a small CPU, and one process compiles on one core: the module runs
its training runs in one fixture, two runs side by side where nothing is timed, with LLVM's
cheaper optimization level (the same for both sides of every comparison). Multi-process CPU
runs switch the persistent compilation cache off (vitvq.distributed), so every pod launch
compiles: keep their number low. The module runs in the suite's serial pass.
"""

import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from workdir_helpers import resume_point

from vitvq import cluster_env, peer_watchdog

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCAL_POD = REPO / "launch" / "local_pod.sh"
STAGE1 = [
    f"--config={REPO / 'configs' / 'vitvq_base.py'}:runlocal",
    "--config.log_every_steps=1",
    # No lazy R1: its step is a second compile in every process (multi-process CPU runs have
    # no compilation cache); tests/test_main.py's CLI run covers it.
    "--config.loss.r1_gamma=0.0",
]
FAST_COMPILE = "--xla_backend_optimization_level=0"
# Two fake devices per process: more than one (a process feeds and shards over its own
# devices, collectives run within and across processes), and no more, since a fake CPU device
# is a thread and a step of the full loss on 8 of them takes 2.5x as long as on one.
LOCAL_DEVICES = 2
GLOBAL_DEVICES = 2 * LOCAL_DEVICES
RTOL = 1e-5
# The survivor of a killed process must be gone this soon: it notices the coordinator's loss
# at once and a silent worker after HEARTBEAT seconds; the rest is slack for a busy machine.
HEARTBEAT = 5
DEATH_BOUND = 60
RUN_TIMEOUT = 900
# The cheap runs: steps enough that every relaunch of the killed pod starts from a committed
# checkpoint and still has steps left to be killed or preempted in (JAX's preemption service
# agrees on a step a few steps after the signal: 3 in a run here).
CHEAP_TOTAL = 20
KEEP = 4  # checkpoints kept: the 1-process run's of CROSS_STEP lasts to its end
CHEAP = [
    *STAGE1,
    "--config.loss.perceptual=0",
    "--config.loss.adversarial=0",
    "--config.eval_lpips=False",
    f"--config.total_steps={CHEAP_TOTAL}",
    f"--config.eval_every_steps={CHEAP_TOTAL}",
    f"--config.image_every_steps={CHEAP_TOTAL}",
    f"--heartbeat_timeout={HEARTBEAT}",
    f"--config.keep_checkpoints={KEEP}",
]
REFERENCE_EVERY = 4  # the reference pod and the 1-process runs checkpoint every 4 steps
CROSS_STEP = 8  # the 1-process run's checkpoint the reference pod (and the killed pod) resume
POD_STEP = 12  # the reference pod's checkpoint a 1-process run resumes


def cheap(every: int) -> list[str]:
    return [*CHEAP, f"--config.checkpoint_every_steps={every}"]


def _env(devices: int | None) -> dict:
    """A clean environment: fake CPU devices (None: local_pod.sh sets them, LOCAL_DEVICES per
    process), the repo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VITVQ_", "SLURM_"))}
    xla = [FAST_COMPILE]
    if devices is not None:
        xla.append(f"--xla_force_host_platform_device_count={devices}")
    else:
        env["DEVICES_PER_PROCESS"] = str(LOCAL_DEVICES)
    env.update(
        XLA_FLAGS=" ".join(xla),
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return env


def _readable(output: str, limit: int = 8000) -> str:
    """The end of a run's output without C++ stack frames and per-step metric lines."""
    noise = re.compile(r"^(\[p\d\] )?(\s+@ |Extension modules|.*logging_writer\.py)")
    return "\n".join(line for line in output.splitlines() if not noise.match(line))[-limit:]


class Run:
    """A training run in a subprocess, its output (stdout and stderr) in `WORKDIR.TAG.log`."""

    def __init__(self, argv, env, workdir, what: str, tag: str = "run", new_session=False):
        """`new_session`: the run leads a process group of its own (see `PreemptedRun`)."""
        self.what = what
        self.log = pathlib.Path(f"{workdir}.{tag}.log")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                [*argv, f"--workdir={workdir}"],
                cwd=REPO,
                env=env,
                stdout=f,
                stderr=f,
                start_new_session=new_session,
            )

    def wait(self) -> str:
        """Waits for the run; its output; fails the test when it did not succeed."""
        rc = self.proc.wait(timeout=RUN_TIMEOUT)
        output = self.log.read_text()
        assert rc == 0, f"{self.what} exited {rc}:\n{_readable(output)}"
        return output

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # local_pod.sh passes it on to its processes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PreemptedRun(Run):
    """A `local_pod.sh 2` run in a session of its own whose whole process group (the launcher,
    its output prefixers, both processes) gets SIGTERM at once, as Ctrl-C or a scheduler's
    `kill -- -PGID` delivers a maintenance event. By default as early as a signal can be
    caught: as soon as both processes catch SIGTERM (vitvq.main records it from its first
    lines), before JAX's distributed runtime has started. `moment`, where given, is polled
    instead: the group gets the signal when it first returns True (both processes started)."""

    def __init__(self, argv, env, workdir, what: str, tag: str = "run", moment=None):
        self.moment = moment
        self.signalled = None  # what `moment` saw when the signal went out
        super().__init__(argv, env, workdir, what, tag, new_session=True)
        threading.Thread(target=self._preempt, daemon=True).start()

    def _training_processes(self) -> list[int]:
        """The `vitvq.main` processes of this run's process group."""
        found = []
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) != self.proc.pid:
                    continue
                if b"vitvq.main" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
        return found

    @staticmethod
    def _catches_sigterm(pid: int) -> bool:
        try:
            status = pathlib.Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
        return bool(caught & (1 << (signal.SIGTERM - 1)))

    def _preempt(self) -> None:
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline and self.proc.poll() is None:
            pids = self._training_processes()
            if len(pids) == 2 and all(self._catches_sigterm(pid) for pid in pids):
                seen = True if self.moment is None else self.moment()
                if seen:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.signalled = seen
                    return
            time.sleep(0.01)


def pod_argv(args) -> list[str]:
    """`launch/local_pod.sh 2 ARGS` (2 processes x LOCAL_DEVICES devices)."""
    return ["bash", str(LOCAL_POD), "2", *args]


def pod(args, workdir, tag: str = "run") -> Run:
    return Run(pod_argv(args), _env(None), workdir, "local_pod.sh 2", tag)


def single(args, workdir) -> Run:
    """`python -m vitvq.main ARGS --workdir=WORKDIR` (1 process x GLOBAL_DEVICES devices)."""
    argv = [sys.executable, "-m", "vitvq.main", *args]
    return Run(argv, _env(GLOBAL_DEVICES), workdir, "1-process run")


def losses(workdir, key: str = "train/loss/total") -> dict[int, float]:
    """step -> `key` from the workdir's metrics.jsonl (written by process 0 only)."""
    out = {}
    with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if key in row:
                assert row["step"] not in out, f"step {row['step']} logged twice"
                out[row["step"]] = row[key]
    return out


def assert_same_losses(got: dict, want: dict, steps):
    for step in steps:
        assert step in got and step in want, (step, sorted(got), sorted(want))
        assert got[step] == pytest.approx(want[step], rel=RTOL), (step, got, want)


def final_evals(output: str) -> list[dict]:
    """The `{"final_eval": ...}` line of every process."""
    rows = [line.split("] ", 1)[-1] for line in output.splitlines() if '{"final_eval"' in line]
    return [json.loads(row)["final_eval"] for row in rows]


def copy_checkpoint(src_workdir, step: int, dst_workdir) -> None:
    """A new workdir whose only checkpoint is `src_workdir`'s of `step` (as if that run had
    stopped there)."""
    shutil.copytree(
        pathlib.Path(src_workdir) / "checkpoints" / str(step),
        pathlib.Path(dst_workdir) / "checkpoints" / str(step),
    )


def checkpoint_steps(workdir) -> list[int]:
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())


# --- processes started directly, and the moments to kill one --------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pod_processes(args, workdir, tag: str):
    """Both processes of a 2-process run of `args`, started directly (no launcher); their
    logs are `WORKDIR.TAG.pI.log`."""
    port = _free_port()
    logs = [pathlib.Path(f"{workdir}.{tag}.p{i}.log") for i in range(2)]
    procs = []
    for i in range(2):
        env = _env(LOCAL_DEVICES)
        env.update(
            VITVQ_COORDINATOR=f"127.0.0.1:{port}",
            VITVQ_NUM_PROCESSES="2",
            VITVQ_PROCESS_ID=str(i),
        )
        with open(logs[i], "w") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-u", "-m", "vitvq.main", *args, f"--workdir={workdir}"],
                    cwd=REPO,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs, logs


def _wait_until(ready, procs, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a process ended before the kill"
        if ready():
            return
        time.sleep(0.2)
    raise AssertionError(f"not ready to kill within {timeout} s")


def _writing_checkpoint(workdir):
    """Ready while a checkpoint is being written: orbax's unfinished directory exists, or a
    step is committed but its digest record (the last part of a save) is not there yet."""
    from vitvq import digests

    ckpts = pathlib.Path(workdir) / "checkpoints"

    def ready() -> bool:
        if not ckpts.is_dir():
            return False
        for p in ckpts.iterdir():
            if "orbax-checkpoint-tmp" in p.name:
                return True
            if p.name.isdigit() and not digests.has_record(p):
                return True
        return False

    return ready


def _recorded_after(workdir, step: int | None):
    """Ready once a checkpoint newer than `step` has its digest record (it is committed): the
    launch has made progress that a relaunch must not lose."""
    from vitvq import digests

    ckpts = pathlib.Path(workdir) / "checkpoints"
    floor = -1 if step is None else step

    def ready() -> bool:
        if not ckpts.is_dir():
            return False
        return any(
            p.name.isdigit() and int(p.name) > floor and digests.has_record(p)
            for p in ckpts.iterdir()
        )

    return ready


def _saving_after(workdir, step: int):
    """A moment: the number of a step newer than `step` while its checkpoint is being written
    (orbax's unfinished directory, or committed without its digest record yet) by a launch
    started after this call; else None. What earlier launches left (a step killed mid-save)
    does not count."""
    from vitvq import digests

    ckpts = pathlib.Path(workdir) / "checkpoints"
    before = {p.name for p in ckpts.iterdir()} if ckpts.is_dir() else set()

    def saving() -> int | None:
        for p in ckpts.iterdir() if ckpts.is_dir() else ():
            if p.name in before:
                continue
            number = p.name.split(".", 1)[0]
            if not number.isdigit() or int(number) <= step:
                continue
            if "orbax-checkpoint-tmp" in p.name or not digests.has_record(p):
                return int(number)
        return None

    return saving


def _kill_one(workdir, attempt: int, victim: int, resume: int | None, rng) -> dict:
    """One launch of the killed pod (checkpointing every step): SIGKILL to `victim`, the
    first time while a checkpoint is being written, later at a random moment (up to half a
    second) after the launch committed a checkpoint of its own. What happened, for the tests."""
    procs, logs = _pod_processes(cheap(1), workdir, f"launch{attempt}")
    try:
        if attempt == 0:
            moment, delay = _writing_checkpoint(workdir), 0.0
        else:
            moment, delay = _recorded_after(workdir, resume), rng.uniform(0.0, 0.5)
        _wait_until(moment, procs, RUN_TIMEOUT)
        time.sleep(delay)
        assert procs[victim].poll() is None, "the run ended before the kill"
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        writing_at_kill = _writing_checkpoint(workdir)()
        try:
            rc = procs[1 - victim].wait(timeout=DEATH_BOUND)
        except subprocess.TimeoutExpired:
            rc = None  # the survivor still ran DEATH_BOUND s after its peer was killed
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = [log.read_text() for log in logs]
    launch = dict(
        victim=victim,
        delay=delay,
        rc=rc,
        elapsed=elapsed,
        writing_at_kill=writing_at_kill,
        resumed_from=resume,
        outputs=out,
        survivor=out[1 - victim],
    )
    listing = sorted(p.name for p in (pathlib.Path(workdir) / "checkpoints").iterdir())
    print(
        f"\nlaunch {attempt} (from step {resume}): process {victim} killed {delay:.2f} s after "
        f"its cue{' mid-save' if writing_at_kill else ''}; the survivor exited {rc} after "
        f"{elapsed:.1f} s; checkpoints {listing}"
    )
    return launch


# --- every training run of the module --------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every training run of the module: {name: workdir}, {name: output or record}."""
    from bundle_helpers import make_tokenizer_bundle

    root = tmp_path_factory.mktemp("runs")
    bundle_path, _ = make_tokenizer_bundle(root / "tokenizer")
    stage2 = [
        f"--config={REPO / 'configs' / 'vim_base.py'}:runlocal",
        f"--config.tokenizer_bundle={bundle_path}",
        "--config.log_every_steps=1",
    ]
    names = (
        "s1_single",
        "s2_single",
        "s1_pod",
        "s2_pod",
        "cheap_single",
        "single_then_pod",
        "pod_then_single",
        "killed",
    )
    workdirs = {name: root / name for name in names}
    out, started = {}, []

    def together(**named):
        started.extend(named.values())
        out.update({name: run.wait() for name, run in named.items()})

    try:
        # 1-process runs: the references of the full-loss pods, and the cheap runs' start.
        together(
            s1_single=single(STAGE1, workdirs["s1_single"]),
            s2_single=single(stage2, workdirs["s2_single"]),
            cheap_single=single(cheap(REFERENCE_EVERY), workdirs["cheap_single"]),
        )
        together(s1_pod=pod(STAGE1, workdirs["s1_pod"]), s2_pod=pod(stage2, workdirs["s2_pod"]))
        # The reference pod resumes the 1-process run's step-2 checkpoint; so does the pod
        # preempted before its first step, in the workdir that is killed afterwards.
        for name in ("single_then_pod", "killed"):
            copy_checkpoint(workdirs["cheap_single"], CROSS_STEP, workdirs[name])
        preempted = PreemptedRun(
            pod_argv(cheap(1)), _env(None), workdirs["killed"], "preempted pod", "preempted"
        )
        together(
            single_then_pod=pod(cheap(REFERENCE_EVERY), workdirs["single_then_pod"]),
            preempted=preempted,
        )
        out["preempted_steps"] = checkpoint_steps(workdirs["killed"])

        # A host lost three times over: random victims, both processes at least once.
        rng = random.Random(22)
        victims = [1, 0, rng.choice([0, 1])]
        rng.shuffle(victims)
        resume = out["preempted_steps"][-1]
        out["kills"] = []
        for attempt, victim in enumerate(victims):
            launch = _kill_one(workdirs["killed"], attempt, victim, resume, rng)
            out["kills"].append(launch)
            if launch["rc"] is None:
                break  # the test of the survivors says so
            resume = resume_point(workdirs["killed"])
        out["resume_after_kills"] = resume

        # Every host preempted again, later: the whole group gets SIGTERM while this launch
        # writes its first checkpoint (the next step already under way).
        late = PreemptedRun(
            pod_argv(cheap(1)),
            _env(None),
            workdirs["killed"],
            "pod preempted mid-save",
            "preempted_late",
            moment=_saving_after(workdirs["killed"], resume),
        )
        started.append(late)
        out["preempted_late"] = late.wait()
        out["preempted_late_saving"] = late.signalled
        resume = resume_point(workdirs["killed"])
        out["resume_after_late"] = resume
        print(f"\npreempted while saving step {late.signalled}; resumable from step {resume}")

        # The preempted command again, to the end; the reference pod's checkpoint of
        # POD_STEP resumed by one process, beside it.
        copy_checkpoint(workdirs["single_then_pod"], POD_STEP, workdirs["pod_then_single"])
        together(
            relaunched=pod(cheap(1), workdirs["killed"], "final"),
            pod_then_single=single(cheap(REFERENCE_EVERY), workdirs["pod_then_single"]),
        )
    finally:
        for run in started:
            run.stop()
    return workdirs, out


def check_pod_against_single(workdirs, out, stage: str, keys, image: str):
    pod_dir, single_dir = workdirs[f"{stage}_pod"], workdirs[f"{stage}_single"]
    for key in keys:
        got, want = losses(pod_dir, key), losses(single_dir, key)
        assert sorted(got) == [1, 2, 3, 4], key
        assert_same_losses(got, want, [1, 2, 3, 4])
    log = out[f"{stage}_pod"]
    for i in (0, 1):  # the topology, once per process
        lines = [
            line for line in log.splitlines() if f"process {i} of 2 (coordinator 127.0.0.1:" in line
        ]
        assert len(lines) == 1 and lines[0].startswith(f"[p{i}]"), _readable(log)
        assert f"{LOCAL_DEVICES} local / {GLOBAL_DEVICES} global devices" in lines[0]
    # gloo printed a line for each device of each communicator it connected (about 10 here);
    # at the default verbosity launch/local_pod.sh shows none of them.
    assert "[Gloo] Rank" not in log and "peer ranks" not in log, _readable(log)
    # Both processes evaluated the same (padded eval batches), as one process does.
    pod_evals, single_evals = final_evals(log), final_evals(out[f"{stage}_single"])
    assert len(pod_evals) == 2 and pod_evals[0] == pod_evals[1]
    assert pod_evals[0] == pytest.approx(single_evals[0], rel=1e-4)
    # Process 0 alone wrote the outputs: one metrics row per step (checked above), the
    # config, the images.
    assert (pod_dir / "config.json").exists()
    assert [p.name for p in (pod_dir / "images").glob("*.png")] == [image]


def test_stage1_two_processes_match_one(runs):
    keys = ("train/loss/total", "train/disc/loss")
    check_pod_against_single(*runs, "s1", keys, "reconstructions_0000004.png")


def test_stage2_two_processes_match_one(runs):
    check_pod_against_single(*runs, "s2", ["train/loss"], "samples_0000004.png")


@pytest.mark.parametrize(
    "name, start, references",
    [
        ("single_then_pod", CROSS_STEP, ["cheap_single"]),
        ("pod_then_single", POD_STEP, ["cheap_single", "single_then_pod"]),
    ],
)
def test_stage1_checkpoints_resume_across_process_counts(runs, name, start, references):
    """A checkpoint written by one process count resumes in the other; the resumed steps
    repeat the uninterrupted runs' losses (the 1-process run's, and the pod's where the pod
    is not the one resuming)."""
    workdirs, out = runs
    assert f"Resumed from the checkpoint of step {start}" in out[name]
    resumed = losses(workdirs[name])
    steps = list(range(start + 1, CHEAP_TOTAL + 1))
    assert sorted(resumed) == steps
    for reference in references:
        assert_same_losses(resumed, losses(workdirs[reference]), steps)
    saved = [start, *range(start + REFERENCE_EVERY, CHEAP_TOTAL + 1, REFERENCE_EVERY)]
    assert checkpoint_steps(workdirs[name]) == saved[-KEEP:]


def _final_state(workdir, step: int):
    import jax
    import numpy as np

    from vitvq.checkpoint import Checkpointer

    with Checkpointer(
        pathlib.Path(workdir) / "checkpoints", save_every_steps=1, read_only=True
    ) as ckpt:
        tree, saved = ckpt.restore_as_saved(step)
    assert saved == step
    return jax.tree_util.tree_leaves_with_path(jax.tree_util.tree_map(np.asarray, tree))


def assert_same_final_state(workdir, reference):
    import numpy as np

    got = _final_state(workdir, CHEAP_TOTAL)
    want = _final_state(reference, CHEAP_TOTAL)
    assert [path for path, _ in got] == [path for path, _ in want]
    for (path, a), (_, b) in zip(got, want, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), path


def agreed_preemption_step(log: str) -> int:
    """The step both processes of a preempted pod checkpointed, each saying so once; no
    `error:` line."""
    agreed = [
        re.findall(rf"^\[p{i}\] .*Preemption notice at step (\d+): checkpoint written", log, re.M)
        for i in (0, 1)
    ]
    assert agreed[0] == agreed[1] and len(agreed[0]) == 1, _readable(log)
    assert not re.search(r"^(\[p\d\] )?error:", log, re.M), _readable(log)
    return int(agreed[0][0])


def test_every_host_preempted_checkpoints_one_step_and_resumes_bit_identical(runs):
    """SIGTERM to the whole group during start-up, before JAX's runtime has started."""
    workdirs, out = runs
    log = out["preempted"]
    # The launcher exited 0 (Run.wait) and the processes' lines came through the prefixers,
    # which the same signal reached.
    step = agreed_preemption_step(log)
    assert CROSS_STEP < step < CHEAP_TOTAL, step
    # The signal came before JAX's runtime had started (in one process at least): the
    # recorded notice went to JAX's preemption service, which the processes agreed through.
    assert re.search(
        r"^\[p[01]\] .*The SIGTERM of the start-up goes to JAX's preemption service", log, re.M
    ), _readable(log)
    assert out["preempted_steps"][-1] == step, (step, out["preempted_steps"])
    # The next launch resumed there (it was killed later: see the killed-host test), and the
    # same command, run again, ended with the uninterrupted reference pod's state.
    first = out["kills"][0]["outputs"][0]
    assert f"Resumed from the checkpoint of step {step}" in first, _readable(first)
    assert "Resumed from the checkpoint of step" in out["relaunched"]
    assert_same_final_state(workdirs["killed"], workdirs["single_then_pod"])


def test_every_host_preempted_mid_save_checkpoints_the_agreed_step_and_resumes(runs):
    """SIGTERM to the whole group while the launch writes its first checkpoint (orbax's
    background write in flight, the next step under way): both processes agree on a step
    at or after the one being saved, checkpoint it, exit 0 with their lines intact; the
    next launch resumes there and ends with the reference pod's state."""
    workdirs, out = runs
    log, saving = out["preempted_late"], out["preempted_late_saving"]
    began = out["resume_after_kills"]
    assert saving is not None and saving > began, (saving, began)
    step = agreed_preemption_step(log)
    assert saving <= step < CHEAP_TOTAL, (saving, step)
    assert "The SIGTERM of the start-up" not in log  # JAX's runtime had it from the start
    assert out["resume_after_late"] == step, (step, out["resume_after_late"])
    assert f"Resumed from the checkpoint of step {step} " in out["relaunched"]
    assert_same_final_state(workdirs["killed"], workdirs["single_then_pod"])


@pytest.mark.parametrize(
    "victim, says",
    [
        (1, "process 1 stopped, so process 0 of 2 stops too (no sign of life for 5 s)"),
        (0, "lost contact with the coordinator (process 0 at 127.0.0.1:"),
    ],
    ids=["worker_dies", "coordinator_dies"],
)
def test_survivor_of_a_killed_process_exits_with_a_clear_error(runs, victim, says):
    """SIGKILL mid-training, no launcher: the survivor itself notices and exits in time,
    always with status 3 and the project's line, also where JAX's runtime reacted first (its
    abort on a lost coordinator or a silent peer is turned into the same exit). Every launch
    of the killed pod with this victim is checked."""
    _, out = runs
    launches = [k for k in out["kills"] if k["victim"] == victim]
    assert launches, [k["victim"] for k in out["kills"]]
    for launch in launches:
        log = launch["survivor"]
        assert launch["rc"] is not None, (
            f"the survivor still ran {DEATH_BOUND} s after its peer was killed:\n" + _readable(log)
        )
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert launch["rc"] == peer_watchdog.PEER_FAILURE_EXIT_CODE, _readable(log)
        assert len(errors) == 1 and "multi-process run stopped" in errors[0], _readable(log)
        assert says in errors[0]
        assert f"process {1 - victim} of 2 stops too" in errors[0]
        if victim == 0:
            assert launch["elapsed"] < 10, launch["elapsed"]


def test_a_killed_host_three_times_over_the_relaunched_pod_resumes_bit_identical(runs):
    """SIGKILL to one process of a 2-process run, three times: first while a checkpoint is
    being written, then at a random moment (up to half a second) after a launch has committed
    a checkpoint of its own; the victim is chosen at random each time. Each relaunch resumes
    from the newest committed checkpoint, and the last one ends with the state of an
    uninterrupted run, bit for bit (that run checkpoints every 4 steps, this one every step)."""
    workdirs, out = runs
    kills = out["kills"]
    assert len(kills) == 3 and {k["victim"] for k in kills} == {0, 1}
    for attempt, launch in enumerate(kills):
        survivor = launch["survivor"]
        errors = [line for line in survivor.splitlines() if line.startswith("error:")]
        assert launch["rc"] == peer_watchdog.PEER_FAILURE_EXIT_CODE, _readable(survivor)
        assert len(errors) == 1 and "multi-process run stopped" in errors[0], _readable(survivor)
        p0 = launch["outputs"][0]
        resumed = re.findall(r"Resumed from the checkpoint of step (\d+)", p0)
        assert resumed == [str(launch["resumed_from"])], _readable(p0)
        if attempt == 0:
            assert launch["writing_at_kill"], "the first kill missed the checkpoint write"
    # Each launch after the first committed progress of its own before its kill, and the
    # next launch resumed there.
    resume = out["resume_after_kills"]
    progress = [k["resumed_from"] for k in kills[1:]] + [resume]
    assert progress == sorted(set(progress)), progress
    assert progress[0] >= kills[0]["resumed_from"], (kills[0]["resumed_from"], progress)

    assert f"Resumed from the checkpoint of step {resume} " in out["preempted_late"]
    assert_same_final_state(workdirs["killed"], workdirs["single_then_pod"])


# JAX's own reaction to a dead peer: LOG(FATAL), then abort().
JAX_FATAL = "Terminating process because the JAX distributed service detected fatal errors"
# A process that only joins the run and waits, arranged so that JAX's runtime reports the
# dead peer before the project's threads do: the coordinator's loss is left to JAX's error
# polling (no coordinator watch; the watchdog's beats 6 s apart), a silent process to JAX's
# heartbeat (6 s: reported 3-6 s after the kill) while the watchdog never stops by itself.
_JAX_FIRST = """
import sys, threading, time
from vitvq import distributed, peer_watchdog
if sys.argv[1] == "coordinator_dies":
    peer_watchdog._Watchdog._listen = lambda self: None
else:
    peer_watchdog.jax_heartbeat_timeout = lambda timeout: 6
    stop_for = peer_watchdog._Watchdog.stop_for
    def stop_for_others(self, dead, silence):
        if threading.current_thread() is not self:
            stop_for(self, dead, silence)
    peer_watchdog._Watchdog.stop_for = stop_for_others
distributed.initialize_if_configured()
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize(
    "victim, heartbeat, says",
    [
        (1, 1, "process 1 stopped, so process 0 of 2 stops too (no sign of life for "),
        (0, 30, "lost contact with the coordinator (process 0 at 127.0.0.1:"),
    ],
    ids=["worker_dies", "coordinator_dies"],
)
def test_survivor_exits_with_a_clear_error_when_jax_reacts_first(tmp_path, victim, heartbeat, says):
    """JAX's abort on a dead peer becomes the project's line and status 3."""
    port = _free_port()
    env = _env(1)
    env.update(VITVQ_COORDINATOR=f"127.0.0.1:{port}", VITVQ_NUM_PROCESSES="2")
    env.update(VITVQ_HEARTBEAT_TIMEOUT=str(heartbeat))
    case = "coordinator_dies" if victim == 0 else "worker_dies"
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = []
    try:
        for i in range(2):
            with open(logs[i], "w") as f:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-u", "-c", _JAX_FIRST, case],
                        cwd=REPO,
                        env={**env, "VITVQ_PROCESS_ID": str(i)},
                        stdout=f,
                        stderr=subprocess.STDOUT,
                    )
                )
        _wait_until(lambda: all("ready" in log.read_text() for log in logs), procs, 120)
        procs[victim].send_signal(signal.SIGKILL)
        rc = procs[1 - victim].wait(timeout=DEATH_BOUND)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log = logs[1 - victim].read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert JAX_FATAL in log, _readable(log)  # JAX's runtime did react first
    assert rc == peer_watchdog.PEER_FAILURE_EXIT_CODE, _readable(log)
    assert len(errors) == 1 and says in errors[0], _readable(log)
    assert f"process {1 - victim} of 2 stops too" in errors[0]


# --- settings --------------------------------------------------------------------------------

BAD_SETTINGS = [
    (["--num_processes=2", "--process_id=0"], {}, "needs the coordinator's address"),
    (["--coordinator=localhost:1", "--num_processes=2", "--process_id=2"], {}, "not in [0, 2)"),
    (["--coordinator=localhost"], {"VITVQ_NUM_PROCESSES": "2"}, "not HOST:PORT"),
    (["--coordinator=localhost:1234", "--num_processes=2"], {}, "needs --process_id"),
    ([], {"VITVQ_NUM_PROCESSES": "two"}, "VITVQ_NUM_PROCESSES='two' is not an integer"),
    (["--process_id=1"], {}, "needs the number of processes"),
    (["--heartbeat_timeout=0"], {}, "--heartbeat_timeout=0 must be at least 1"),
]
# This case runs as a real `python -m vitvq.main` process (exit status 2, one line, no
# traceback, a setting from the environment); the others run its entry point in this
# process (tests/inprocess_cli.py) with VITVQ_* and SLURM_* unset and the case's variables set.
SUBPROCESS_SETTING = "not HOST:PORT"


@pytest.mark.parametrize("flags, env, says", BAD_SETTINGS)
def test_inconsistent_settings_are_one_line_errors(capfd, tmp_path, flags, env, says):
    args = [*STAGE1, f"--workdir={tmp_path / 'w'}", *flags]
    if says == SUBPROCESS_SETTING:
        proc = subprocess.run(
            [sys.executable, "-m", "vitvq.main", *args],
            cwd=REPO,
            env={**_env(1), **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
    else:
        from inprocess_cli import run_module_main

        proc = run_module_main(
            capfd, "vitvq.main", args, cwd=REPO, env=env, unset_env_prefixes=("VITVQ_", "SLURM_")
        )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and says in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_settings_resolution():
    resolve = cluster_env.resolve
    assert resolve(environ={}, on_tpu_vm=False).mode == "single"
    assert resolve(environ={}, on_tpu_vm=True).mode == "tpu"
    s = resolve("h:1", 2, 1, environ={}, on_tpu_vm=False)
    assert (s.mode, s.coordinator, s.num_processes, s.process_id) == ("explicit", "h:1", 2, 1)
    env = {"VITVQ_COORDINATOR": "h:2", "VITVQ_NUM_PROCESSES": "4", "VITVQ_PROCESS_ID": "3"}
    assert resolve(environ=env).process_id == 3
    assert resolve(process_id=0, environ=env).process_id == 0  # a flag wins over the env
    assert resolve(environ={**env, "VITVQ_HEARTBEAT_TIMEOUT": "7"}).heartbeat_timeout == 7
    slurm = {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4"}
    assert resolve(environ=slurm, on_tpu_vm=False).mode == "slurm"
    assert resolve(environ={**slurm, "SLURM_NTASKS": "1"}, on_tpu_vm=False).mode == "single"
    assert resolve(environ={**slurm, "VITVQ_DISTRIBUTED": "0"}).mode == "single"
    assert resolve(environ={"VITVQ_DISTRIBUTED": "1"}, on_tpu_vm=False).mode == "auto"
    assert resolve(num_processes=1, environ={}).mode == "single"
    assert resolve(environ={}, on_tpu_vm=False).heartbeat_timeout == (
        cluster_env.DEFAULT_HEARTBEAT_TIMEOUT
    )
