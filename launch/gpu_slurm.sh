#!/usr/bin/env bash
# Train on several GPU nodes of a SLURM cluster: writes an sbatch script that starts one
# process per GPU with srun (all running the same `python -m vitvq.main`) and submits it.
#
#   launch/gpu_slurm.sh --nodes=4 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
#       --venv=/shared/venvs/vitvq --config=configs/vitvq_base.py --workdir=/shared/runs/base
#
# Run `launch/gpu_slurm.sh --help` for every option. `--dry_run` prints the sbatch script on
# stdout (and the sbatch command on stderr) and submits nothing.
#
# One process per GPU: under SLURM, jax.distributed.initialize() takes the coordinator, the
# process count and id from srun's variables and gives each process the GPU numbered
# SLURM_LOCALID, so every task must see all GPUs of its node (srun --gpu-bind=none).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_slurm.sh --config=FILE[:ARG] --workdir=DIR [options]
                           [--config.KEY=VALUE ...] [-- MORE_MAIN_FLAGS ...]

Job:
  --nodes=N              nodes (default 1)
  --gpus_per_node=G      GPUs per node, one process each (default 8)
  --cpus_per_task=C      CPU cores per process (default: the cluster's)
  --partition=P          partition (default: the cluster's)
  --account=A            account to charge (default: yours)
  --time=T               time limit: MINUTES, HH:MM:SS or D-HH:MM:SS (default: the partition's)
  --job_name=NAME        (default vitvq)
  --output=PATTERN       log file, relative to the repository root (default
                         runs/slurm/%x-%j.out: job name and id)
  --sbatch_arg=ARG       one more #SBATCH line, e.g. --sbatch_arg=--qos=high (repeatable)
  --script=FILE          where the sbatch script is written (default runs/slurm/NAME.sbatch)
Environment (the repository must be on a file system that all nodes share):
  --venv=DIR             virtualenv to activate on each node (DIR/bin/activate)
  --python=PY            Python interpreter (default python)
Training:
  --config=FILE[:ARG]    config file (required)
  --workdir=DIR          run directory on shared storage (required)
  --config.KEY=VALUE     config overrides, passed through unchanged (repeatable)
  -- ARGS                anything after `--` is passed to vitvq.main unchanged
Other:
  --dry_run              print the sbatch script and submit nothing
  --help                 this text

Bad options exit with status 2 and one line naming the option.
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

positive_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

# --- options -------------------------------------------------------------------------------
nodes=1 gpus_per_node=8 cpus_per_task="" partition="" account="" time_limit="" job_name="vitvq"
output="runs/slurm/%x-%j.out" script="" venv="" python="python" config="" workdir=""
dry_run=0
sbatch_args=()
main_args=()
while [ "$#" -gt 0 ]; do
  arg="$1"
  shift
  case "$arg" in
    --help | -h)
      usage
      exit 0
      ;;
    --nodes=*) nodes="${arg#*=}" ;;
    --gpus_per_node=*) gpus_per_node="${arg#*=}" ;;
    --cpus_per_task=*) cpus_per_task="${arg#*=}" ;;
    --partition=*) partition="${arg#*=}" ;;
    --account=*) account="${arg#*=}" ;;
    --time=*) time_limit="${arg#*=}" ;;
    --job_name=*) job_name="${arg#*=}" ;;
    --output=*) output="${arg#*=}" ;;
    --sbatch_arg=*) sbatch_args+=("${arg#*=}") ;;
    --script=*) script="${arg#*=}" ;;
    --venv=*) venv="${arg#*=}" ;;
    --python=*) python="${arg#*=}" ;;
    --config=*) config="${arg#*=}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --dry_run) dry_run=1 ;;
    --config.*) main_args+=("$arg") ;;
    --)
      main_args+=("$@")
      break
      ;;
    --nodes | --gpus_per_node | --cpus_per_task | --partition | --account | --time | \
      --job_name | --output | --sbatch_arg | --script | --venv | --python | --config | --workdir)
      die "$arg needs a value: $arg=VALUE"
      ;;
    --dry_run=*) die "--dry_run takes no value, got '$arg'" ;;
    *) die "unknown option '$arg' (see --help; flags for vitvq.main go after --)" ;;
  esac
done

positive_int "$nodes" || die "--nodes must be a positive integer, got '$nodes'"
positive_int "$gpus_per_node" ||
  die "--gpus_per_node must be a positive integer, got '$gpus_per_node'"
[ -z "$cpus_per_task" ] || positive_int "$cpus_per_task" ||
  die "--cpus_per_task must be a positive integer, got '$cpus_per_task'"
[ -z "$time_limit" ] || [[ "$time_limit" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] ||
  die "--time must be MINUTES, HH:MM:SS or D-HH:MM:SS, got '$time_limit'"
[[ "$job_name" =~ ^[A-Za-z0-9_.-]+$ ]] ||
  die "--job_name must be letters, digits, '_', '.' or '-', got '$job_name'"
for value in "$partition" "$account" "$output" "${sbatch_args[@]+"${sbatch_args[@]}"}"; do
  [[ "$value" != *$'\n'* ]] || die "#SBATCH values cannot contain a newline, got '$value'"
done
for arg in "${sbatch_args[@]+"${sbatch_args[@]}"}"; do
  [[ "$arg" == -* ]] || die "--sbatch_arg must be an sbatch option such as --qos=high, got '$arg'"
done
[ -z "$venv" ] || [ -f "$venv/bin/activate" ] || die "--venv: no $venv/bin/activate"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "$config" ] || die "--config is required: --config=configs/FILE.py[:ARG]"
config_file="${config%%:*}"
if [[ "$config_file" == /* ]]; then
  [ -f "$config_file" ] || die "--config: no file '$config_file'"
else
  [ -f "$repo/$config_file" ] || die "--config: no file '$config_file' in $repo"
fi
[ -n "$workdir" ] || die "--workdir is required: --workdir=DIR (on storage that all nodes share)"
[ -n "$script" ] || script="$repo/runs/slurm/${job_name}.sbatch"
main_args=("--config=$config" "--workdir=$workdir" "${main_args[@]+"${main_args[@]}"}")

# --- the sbatch script ---------------------------------------------------------------------
sbatch_script() {
  echo "#!/usr/bin/env bash"
  echo "# Written by launch/gpu_slurm.sh."
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$gpus_per_node"
  echo "#SBATCH --gpus-per-node=$gpus_per_node"
  [ -z "$cpus_per_task" ] || echo "#SBATCH --cpus-per-task=$cpus_per_task"
  [ -z "$partition" ] || echo "#SBATCH --partition=$partition"
  [ -z "$account" ] || echo "#SBATCH --account=$account"
  [ -z "$time_limit" ] || echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --chdir=$repo"
  echo "#SBATCH --output=$output"
  # SIGTERM two minutes before the time limit: vitvq.main checkpoints and stops.
  echo "#SBATCH --signal=TERM@120"
  local extra
  for extra in "${sbatch_args[@]+"${sbatch_args[@]}"}"; do
    echo "#SBATCH $extra"
  done
  echo "set -euo pipefail"
  [ -z "$venv" ] || echo "source $(quote "$venv/bin/activate")"
  echo "# jax.distributed.initialize() reads the cluster layout from srun's SLURM_* variables."
  echo "export VITVQ_DISTRIBUTED=1"
  echo "srun --gpu-bind=none --kill-on-bad-exit=1 $(quote "$python") -u -m vitvq.main" \
    "$(quote "${main_args[@]}")"
}

if [ "$dry_run" -eq 1 ]; then
  sbatch_script
  echo "+ sbatch $(quote "$script")" >&2
  exit 0
fi
if ! command -v sbatch >/dev/null; then
  echo "error: sbatch not found; run this on a SLURM login node" >&2
  exit 1
fi
mkdir -p "$(dirname "$script")"
case "$output" in
  /*) mkdir -p "$(dirname "$output")" ;;
  */*) mkdir -p "$repo/$(dirname "$output")" ;;
esac
sbatch_script >"$script"
echo "+ sbatch $(quote "$script")"
sbatch "$script"
