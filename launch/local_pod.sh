#!/usr/bin/env bash
# N local CPU processes that behave like an N-host pod (JAX's multi-controller runtime over
# localhost, gloo collectives, fake CPU devices per process).
#
#   launch/local_pod.sh N [ARGS...]        ARGS go to `python -m vitvq.main`
#   e.g. launch/local_pod.sh 2 --config=configs/vitvq_base.py:runlocal --workdir=/tmp/pod
#
# Environment: DEVICES_PER_PROCESS (default 4), PORT (coordinator port on localhost; default
# a free one), PYTHON (default python), MODULE (default vitvq.main), LOG_DIR (default: none;
# when set, process i also writes LOG_DIR/process_i.log).
# Every process's output is prefixed with [pI]. When one process fails, the others are stopped
# at once and the script exits with that process's status; it exits 0 when all succeed.
set -euo pipefail

usage() {
  echo "usage: launch/local_pod.sh NUM_PROCESSES [ARGS for python -m \${MODULE:-vitvq.main}...]" >&2
  exit 2
}

[ "$#" -ge 1 ] || usage
num="$1"
shift
if ! [[ "$num" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_PROCESSES must be a positive integer, got '$num'" >&2
  usage
fi
devices="${DEVICES_PER_PROCESS:-4}"
if ! [[ "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: DEVICES_PER_PROCESS must be a positive integer, got '$devices'" >&2
  exit 2
fi
python="${PYTHON:-python}"
module="${MODULE:-vitvq.main}"
port="${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

# gloo (the CPU collectives) prints "[Gloo] Rank R is connected to N peer ranks. Expected
# number of connected peer ranks is : N" from C++ for every device of every communicator, about
# 30 lines before the first step, the two devices of a process often mixed into one line. The
# prefixer drops those pieces (and a line left with nothing else) unless --verbosity is 1 or
# more; LOG_DIR's files keep everything.
gloo_lines='/\[Gloo\]|connected to|peer ranks/{
  s/\[Gloo\] Rank //g
  s/ ?peer ranks\. ?(Expected number of connected peer ranks is : [0-9]*)?//g
  s/Expected number of connected peer ranks is : [0-9]*//g
  s/[0-9]* is connected to [0-9]*//g
  /^[[:space:][:digit:]]*$/d
}'
for arg in "$@"; do
  case "$arg" in
  --verbosity=[1-9]* | -v=[1-9]* | --v=[1-9]*) gloo_lines="" ;;
  esac
done

pids=()
# SIGTERM or Ctrl-C to this script goes to every process (a maintenance event reaches every
# host at once); they agree on a step, checkpoint it and exit 0, and so does this script.
# shellcheck disable=SC2329  # called by the trap below
cleanup() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap cleanup INT TERM

for ((i = 0; i < num; i++)); do
  log="/dev/null"
  if [ -n "${LOG_DIR:-}" ]; then
    mkdir -p "$LOG_DIR"
    log="$LOG_DIR/process_${i}.log"
  fi
  # The environment of a pod's host: the coordinator, this process's id, fake CPU devices.
  # The output's prefixer ignores INT and TERM (and ends when the process closes its
  # output): a signal to the whole process group (Ctrl-C, `kill -- -PGID`) must reach the
  # processes without cutting off what they print while they checkpoint and exit.
  VITVQ_COORDINATOR="127.0.0.1:${port}" VITVQ_NUM_PROCESSES="$num" VITVQ_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" \
    "$python" -u -m "$module" "$@" > >(
      trap '' INT TERM
      tee "$log" | sed -u -E "${gloo_lines}
s/^/[p${i}] /"
    ) 2>&1 &
  pids+=("$!")
done

# Wait for the first process to finish; on a failure, stop the rest.
status=0
remaining=("${pids[@]}")
while [ "${#remaining[@]}" -gt 0 ]; do
  set +e
  done_pid=""
  wait -n -p done_pid "${remaining[@]}"
  rc=$?
  set -e
  if [ -z "${done_pid:-}" ]; then
    continue # a trapped signal interrupted the wait: the processes are still finishing
  fi
  next=()
  for pid in "${remaining[@]}"; do
    [ "$pid" = "$done_pid" ] || next+=("$pid")
  done
  remaining=("${next[@]+"${next[@]}"}")
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status="$rc"
    echo "local_pod: a process exited with status $rc; stopping the others" >&2
    for pid in "${remaining[@]+"${remaining[@]}"}"; do
      kill -TERM "$pid" 2>/dev/null || true
    done
  fi
done
exit "$status"
