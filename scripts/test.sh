#!/usr/bin/env bash
# The whole test suite, as CI runs it: two passes, each printing its 25 slowest tests.
#   1. everything not marked `serial`, on two pytest-xdist workers; --dist loadfile keeps a
#      module on one worker, so its module-scoped fixtures (training runs) run once;
#   2. the `serial` tests (rendezvous windows, heartbeats, SIGTERM/SIGKILL, time bounds) on
#      their own, with the machine to themselves.
# Arguments go to both passes (e.g. `-x`, `-k probe`). Exit status: the first failing pass's
# (pytest's 5, "no tests collected", counts as success: a -k may select none in one pass).
# VITVQ_TEST_WORKERS sets the number of workers of the first pass (default 2).
# VITVQ_TEST_JAX_CACHE=off runs with no persistent compilation cache (tests/conftest.py).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

status=0
run_pass() {
  local name=$1
  shift
  local start=$SECONDS rc
  python -m pytest "$@"
  rc=$?
  if [ "$rc" -eq 5 ]; then
    rc=0
  fi
  echo "== ${name} pass: $((SECONDS - start)) s wall, exit status ${rc}"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
  fi
}

total=$SECONDS
run_pass parallel -n "${VITVQ_TEST_WORKERS:-2}" --dist loadfile -m "not serial" "$@"
run_pass serial -p no:xdist -m serial "$@"
echo "== whole suite: $((SECONDS - total)) s wall, exit status ${status}"
exit "$status"
