#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one or many hosts): create or reuse the slice, copy this
# checkout to every worker, install it, run the same `python -m vitvq.main` on all workers
# (JAX finds the other hosts itself), stream the output, optionally delete the slice.
#
#   launch/tpu_vm.sh --name=my-tpu --zone=us-central2-b --accelerator_type=v4-32 --create \
#       --config=configs/vitvq_base.py --workdir=gs://my-bucket/vitvq_base [--config.KEY=VALUE ...]
#
# Run `launch/tpu_vm.sh --help` for every option. `--dry_run` prints the commands (one per
# line, prefixed with "+ ") and runs none of them.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name=NAME --zone=ZONE --config=FILE[:ARG] --workdir=gs://BUCKET/DIR
                        [options] [--config.KEY=VALUE ...] [-- MORE_MAIN_FLAGS ...]

Slice:
  --name=NAME              TPU VM name (lower case letters, digits, '-')
  --zone=ZONE              e.g. us-central2-b
  --project=PROJECT        GCP project (default: gcloud's configured project)
  --create                 create the slice when it does not exist (else it must exist)
  --accelerator_type=TYPE  with --create: e.g. v4-8, v4-128, v5p-64, v5litepod-16, v6e-16
  --version=RUNTIME        with --create: TPU software version (default by generation:
                           tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5 for v5p,
                           v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e)
  --spot | --preemptible   with --create: a spot / preemptible slice
  --delete_after           delete the slice when training ends (also after a failure)
Install:
  --remote_dir=DIR         where the checkout goes on each worker, under $HOME (default vitvq)
  --remote_python=PY       Python >= 3.11 on the workers, installed with apt when missing
                           (default python3.11); the virtualenv is ~/DIR-venv
  --skip_install           reuse the copy and virtualenv already on the workers
Training:
  --config=FILE[:ARG]      config file, relative to the repository root (required)
  --workdir=gs://B/DIR     run directory on GCS, shared by all workers (required)
  --config.KEY=VALUE       config overrides, passed through unchanged (repeatable)
  -- ARGS                  anything after `--` is passed to vitvq.main unchanged
  --detach                 start training in the background on every worker (output in
                           ~/vitvq_train.log there) and return at once
Other:
  --dry_run                print every command (prefixed with "+ ") and run nothing
  --help                   this text

Bad options exit with status 2 and one line naming the option.
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# --- options -------------------------------------------------------------------------------
name="" zone="" project="" accelerator_type="" version="" config="" workdir=""
remote_dir="vitvq" remote_python="python3.11"
create=0 delete_after=0 spot=0 preemptible=0 skip_install=0 detach=0 dry_run=0
main_args=()
while [ "$#" -gt 0 ]; do
  arg="$1"
  shift
  case "$arg" in
    --help | -h)
      usage
      exit 0
      ;;
    --name=*) name="${arg#*=}" ;;
    --zone=*) zone="${arg#*=}" ;;
    --project=*) project="${arg#*=}" ;;
    --accelerator_type=*) accelerator_type="${arg#*=}" ;;
    --version=*) version="${arg#*=}" ;;
    --config=*) config="${arg#*=}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --remote_dir=*) remote_dir="${arg#*=}" ;;
    --remote_python=*) remote_python="${arg#*=}" ;;
    --create) create=1 ;;
    --delete_after) delete_after=1 ;;
    --spot) spot=1 ;;
    --preemptible) preemptible=1 ;;
    --skip_install) skip_install=1 ;;
    --detach) detach=1 ;;
    --dry_run) dry_run=1 ;;
    --config.*) main_args+=("$arg") ;;
    --)
      main_args+=("$@")
      break
      ;;
    --name | --zone | --project | --accelerator_type | --version | --config | --workdir | \
      --remote_dir | --remote_python)
      die "$arg needs a value: $arg=VALUE"
      ;;
    --create=* | --delete_after=* | --spot=* | --preemptible=* | --skip_install=* | \
      --detach=* | --dry_run=*)
      die "${arg%%=*} takes no value, got '$arg'"
      ;;
    *) die "unknown option '$arg' (see --help; flags for vitvq.main go after --)" ;;
  esac
done

[ -n "$name" ] || die "--name is required: --name=NAME (the TPU VM)"
[[ "$name" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "--name must be lower case letters, digits and '-', starting with a letter, got '$name'"
[ -n "$zone" ] || die "--zone is required, e.g. --zone=us-central2-b"
[[ "$zone" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
  die "--zone must look like us-central2-b, got '$zone'"
[ -z "$project" ] || [[ "$project" =~ ^[a-z][-a-z0-9.:]*[a-z0-9]$ ]] ||
  die "--project must be a GCP project id, got '$project'"
[ "$spot" -eq 0 ] || [ "$preemptible" -eq 0 ] || die "--spot and --preemptible exclude each other"
if [ "$create" -eq 1 ]; then
  [ -n "$accelerator_type" ] || die "--accelerator_type is required with --create, e.g. v4-32"
  [[ "$accelerator_type" =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
    die "--accelerator_type must look like v4-32 or v5litepod-16, got '$accelerator_type'"
  if [ -z "$version" ]; then
    case "$accelerator_type" in
      v2-* | v3-* | v4-*) version="tpu-ubuntu2204-base" ;;
      v5p-*) version="v2-alpha-tpuv5" ;;
      v5litepod-* | v5e-*) version="v2-alpha-tpuv5-lite" ;;
      v6e-*) version="v2-alpha-tpuv6e" ;;
      *) die "--version is required for --accelerator_type=$accelerator_type (no default known)" ;;
    esac
  fi
else
  for flag in accelerator_type version spot preemptible; do
    value="${!flag}"
    if [ -n "$value" ] && [ "$value" != 0 ]; then
      die "--$flag only applies with --create (the slice is reused as it is)"
    fi
  done
fi
[[ "$remote_dir" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] ||
  die "--remote_dir must be one directory name under \$HOME, got '$remote_dir'"
[[ "$remote_python" =~ ^python3\.[0-9]+$ ]] ||
  die "--remote_python must look like python3.11, got '$remote_python'"
[ "$detach" -eq 0 ] || [ "$delete_after" -eq 0 ] ||
  die "--detach and --delete_after exclude each other (the slice would go while training)"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "$config" ] || die "--config is required: --config=configs/FILE.py[:ARG]"
config_file="${config%%:*}"
[[ "$config_file" != /* ]] ||
  die "--config must be relative to the repository root (as on the workers), got '$config_file'"
[ -f "$repo/$config_file" ] || die "--config: no file '$config_file' in $repo"
[ -n "$workdir" ] || die "--workdir is required: --workdir=gs://BUCKET/DIR"
if [[ "$workdir" != gs://* ]]; then
  echo "warning: --workdir=$workdir is not on GCS: each worker would write its own disk, and" \
    "multi-host checkpoints need storage that all workers share (use gs://BUCKET/DIR)" >&2
fi
main_args=("--config=$config" "--workdir=$workdir" "${main_args[@]+"${main_args[@]}"}")

# --- running commands ----------------------------------------------------------------------
location=("--zone=$zone")
[ -z "$project" ] || location+=("--project=$project")

show() { echo "+ $(quote "$@")"; }

# Prints a command, and runs it unless --dry_run.
run() {
  show "$@"
  [ "$dry_run" -eq 1 ] || "$@"
}

if [ "$dry_run" -eq 0 ] && ! command -v gcloud >/dev/null; then
  echo "error: gcloud not found; install the Google Cloud SDK (https://cloud.google.com/sdk)" >&2
  exit 1
fi

# 1. The slice: reuse it when it exists, else create it (--create) or stop.
describe=(gcloud compute tpus tpu-vm describe "$name" "${location[@]}" "--format=value(state)")
create_cmd=(gcloud compute tpus tpu-vm create "$name" "${location[@]}"
  "--accelerator-type=$accelerator_type" "--version=$version")
[ "$spot" -eq 0 ] || create_cmd+=(--spot)
[ "$preemptible" -eq 0 ] || create_cmd+=(--preemptible)
if [ "$dry_run" -eq 1 ]; then
  show "${describe[@]}"
  if [ "$create" -eq 1 ]; then
    echo "# only when the describe above finds no such TPU VM:"
    show "${create_cmd[@]}"
  fi
else
  show "${describe[@]}"
  if state="$("${describe[@]}" 2>/dev/null)"; then
    echo "TPU VM $name exists (state $state); reusing it"
    if [ "$state" != "READY" ]; then
      echo "error: TPU VM $name is $state, not READY; wait, or delete it with:" \
        "gcloud compute tpus tpu-vm delete $name $(quote "${location[@]}")" >&2
      exit 1
    fi
  elif [ "$create" -eq 1 ]; then
    run "${create_cmd[@]}"
  else
    echo "error: no TPU VM '$name' in $zone (pass --create to create it)" >&2
    exit 1
  fi
fi

ssh_all=(gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker=all)
# shellcheck disable=SC2088  # "~" is expanded by the shell on the workers
venv="~/${remote_dir}-venv"

# 2. Copy this checkout (tracked and untracked files that git does not ignore) to every
# worker and install it with the TPU build of JAX in a virtualenv there.
if [ "$skip_install" -eq 0 ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  tarball="$tmp/${remote_dir}.tar.gz"
  echo "+ git -C $(quote "$repo") ls-files --cached --others --exclude-standard" \
    "| tar -czf $(quote "$tarball") -C $(quote "$repo") -T -"
  if [ "$dry_run" -eq 0 ]; then
    if ! git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      echo "error: $repo is not a git checkout: the files to copy come from git ls-files" >&2
      exit 1
    fi
    (
      cd "$repo"
      git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' file; do
          if [ -e "$file" ]; then printf '%s\0' "$file"; fi # skip deleted tracked files
        done |
        tar --null -T - -czf "$tarball"
    )
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:${remote_dir}.tar.gz" "${location[@]}" \
    --worker=all
  # Ubuntu 22.04 images have Python 3.10: install the requested Python when it is missing.
  # `pip install -e . jax[tpu]` resolves the TPU build of JAX within setup.py's JAX range.
  setup="set -e"
  setup+="; if [ ! -x $venv/bin/python ]; then"
  setup+=" $remote_python -c 'import ensurepip' >/dev/null 2>&1 ||"
  setup+=" { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install"
  setup+=" -y -qq $remote_python ${remote_python}-venv; };"
  setup+=" $remote_python -m venv $venv; fi"
  setup+="; rm -rf ~/$remote_dir && mkdir -p ~/$remote_dir"
  setup+=" && tar -xzf ~/${remote_dir}.tar.gz -C ~/$remote_dir"
  setup+="; $venv/bin/python -m pip install -q --upgrade pip"
  setup+="; $venv/bin/python -m pip install -q -e ~/$remote_dir 'jax[tpu]'"
  run "${ssh_all[@]}" "--command=$setup"
fi

# 3. Train: the same command on every worker. VITVQ_DISTRIBUTED=1 makes vitvq.main call
# jax.distributed.initialize(), which reads the slice's layout from the TPU VM metadata.
train="cd ~/$remote_dir && VITVQ_DISTRIBUTED=1"
if [ "$detach" -eq 1 ]; then
  train+=" nohup $venv/bin/python -u -m vitvq.main $(quote "${main_args[@]}")"
  train+=" > ~/vitvq_train.log 2>&1 < /dev/null &"
else
  train+=" exec $venv/bin/python -u -m vitvq.main $(quote "${main_args[@]}")"
fi
status=0
run "${ssh_all[@]}" "--command=$train" || status=$?
if [ "$detach" -eq 1 ]; then
  echo "# training runs in the background; follow worker 0 with:"
  echo "#   gcloud compute tpus tpu-vm ssh $name $(quote "${location[@]}") --worker=0" \
    "--command='tail -f ~/vitvq_train.log'"
elif [ "$status" -ne 0 ]; then
  echo "tpu_vm: training exited with status $status" >&2
fi

# 4. Delete the slice (checkpoints and metrics are on GCS).
if [ "$delete_after" -eq 1 ]; then
  run gcloud compute tpus tpu-vm delete "$name" "${location[@]}" --quiet
fi
exit "$status"
