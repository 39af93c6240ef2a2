#!/usr/bin/env bash
# Issue 7's benchmarks at paper scale on one accelerator, synthetic data, bfloat16:
#
#   1. ViT-VQGAN SS stage-1 step at 256x256   train_step.py --preset=vitvq_ss_gpu (batch 64)
#   2. VIM-Base step, 1024 tokens per image    train_step.py --preset=vim_base_gpu (batch 16)
#   3. VIM-Base sampling, 1024 tokens          sample.py --preset=vim_base (batch 64)
#   4. nearest-code search, chunked vs whole   code_search.py (8 x 1024 tokens, 8192 codes)
#  [5. SS stage-1 step with the discriminator  train_step.py --preset=vitvq_ss_gan_gpu, --gan]
#
#   bash benchmarks/gpu_suite.sh           # ~5 minutes on one H200, compilation included
#   bash benchmarks/gpu_suite.sh --gan     # also 5. (about 1.5 minutes more)
#   bash benchmarks/gpu_suite.sh --smoke   # the same script on tiny presets (a CPU: ~1 minute)
#
# Needs python3 with JAX, flax, optax and numpy; no TensorFlow, ml_collections or clu (each
# benchmark builds its model from plain-dict presets). Each benchmark runs in its own process
# under a time limit; one that fails is reported and the others still run. Each JSON result
# goes to DIR/NAME.json, all output to DIR/suite.log, the table to DIR/table.md, where DIR is
# $OUT when set, else a new temporary folder. The table is printed last.
#
# Environment: PYTHON (default python3), STEPS (timed train steps, default 10), SS_BATCH (64),
# VIM_BATCH (16), SAMPLE_BATCH (64), LIMIT (seconds per benchmark, default 240).
set -uo pipefail

usage() {
  echo "usage: bash benchmarks/gpu_suite.sh [--smoke] [--gan]" >&2
  exit 2
}

smoke=0
gan=0
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    --gan) gan=1 ;;
    *) echo "error: unknown option '$arg'" >&2; usage ;;
  esac
done

cd "$(dirname "$0")/.." || exit 1
python="${PYTHON:-python3}"
dir="${OUT:-$(mktemp -d -t vitvq_gpu_suite.XXXXXX)}"
mkdir -p "$dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=2
log="$dir/suite.log"
: >"$log"

steps="${STEPS:-10}"
limit="${LIMIT:-240}"
if [ "$smoke" -eq 1 ]; then
  # A check of the script, not a measurement: compile fast (LLVM unoptimized, ~40% less).
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
  steps=1
  ss=(--preset=tiny --batch=4)
  vim=(--preset=vim_tiny --batch=4)
  gan_args=(--preset=tiny_gan --batch=4)
  sample=(--preset=tiny --tokens=16 --batch=2 --repeats=1)
  search=(--tokens=512 --codes=1024 --dim=8 --chunk=256 --repeats=2)
  warmup=0
else
  ss=(--preset=vitvq_ss_gpu --batch="${SS_BATCH:-64}")
  vim=(--preset=vim_base_gpu --batch="${VIM_BATCH:-16}")
  gan_args=(--preset=vitvq_ss_gan_gpu)
  sample=(--preset=vim_base --tokens=1024 --batch="${SAMPLE_BATCH:-64}" --dtype=bfloat16
    --repeats=3)
  search=()
  warmup=2
fi

failed=0
# bench NAME SCRIPT ARGS...: runs one benchmark, keeps its last line as DIR/NAME.json.
bench() {
  local name="$1" script="$2"
  shift 2
  local out="$dir/$name.out"
  echo "== $name: $script $*" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$python" "benchmarks/$script" "$@" >"$out" 2>&1
  local rc=$?
  cat "$out" >>"$log"
  if [ "$rc" -eq 0 ] && tail -n 1 "$out" | "$python" -c 'import json, sys; json.loads(sys.stdin.read())' 2>/dev/null; then
    tail -n 1 "$out" >"$dir/$name.json"
    echo "   ok in $((SECONDS - start)) s" | tee -a "$log"
  else
    failed=$((failed + 1))
    echo "   FAILED (status $rc) after $((SECONDS - start)) s; last lines:" | tee -a "$log"
    tail -n 5 "$out" | sed 's/^/   | /'
  fi
  rm -f "$out"
}

train=(--steps="$steps" --warmup="$warmup")
bench stage1_ss train_step.py "${ss[@]}" "${train[@]}"
bench vim_base train_step.py "${vim[@]}" "${train[@]}"
bench sample_vim_base sample.py "${sample[@]}"
bench code_search code_search.py "${search[@]}"
if [ "$gan" -eq 1 ]; then
  bench stage1_ss_gan train_step.py "${gan_args[@]}" "${train[@]}"
fi

"$python" - "$dir" <<'EOF' | tee "$dir/table.md"
import json, pathlib, sys

d = pathlib.Path(sys.argv[1])
def load(name):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None

rows = ["| benchmark | batch | step / run | throughput | MFU (cost analysis / hand count) | peak memory |",
        "|---|---|---|---|---|---|"]
for name, what in (("stage1_ss", "ViT-VQGAN SS stage-1 step"), ("stage1_ss_gan", "SS stage-1 step + GAN"),
                   ("vim_base", "VIM-Base train step")):
    r = load(name)
    if r is None:
        if name != "stage1_ss_gan":
            rows.append(f"| {what} | - | failed | - | - | - |")
        continue
    rows.append(
        f"| {what} ({r['what']}, {r['image_size']}px, {r['dtype']}) | {r['batch']} | {1e3 * r['step_seconds']:.1f} ms "
        f"| {r['images_per_sec']:.1f} images/s | {r['mfu']:.3f} / {r['mfu_hand']:.3f} "
        f"| {r['peak_memory_bytes'] / 2**30:.2f} GiB |")
r = load("sample_vim_base")
if r is None:
    rows.append("| VIM sampling | - | failed | - | - | - |")
else:
    rows.append(
        f"| VIM sampling ({r['tokens']} tokens, {r['dtype']}) | {r['batch']} "
        f"| {r['seconds_per_sample_batch']:.2f} s | {r['tokens_per_sec']:.0f} tokens/s "
        f"| bandwidth {r['bandwidth_fraction']:.2f} | - |")
r = load("code_search")
if r is None:
    rows.append("| nearest-code search | - | failed | - | - | - |")
else:
    rows.append(
        f"| nearest-code search ({r['tokens']} x {r['codes']}) | - "
        f"| {r['chunked_ms']:.2f} ms chunked, {r['unchunked_ms']:.2f} ms whole "
        f"| x{r['speedup_chunked_vs_unchunked']:.2f} | - "
        f"| temp {r['chunked_temp_bytes'] / 2**20:.0f} MiB vs {r['unchunked_temp_bytes'] / 2**20:.0f} MiB |")
first = load("stage1_ss") or load("vim_base")
if first:
    rows.append(f"\n{first['device_kind']}: measured matmul peak {first['peak_flops_per_sec'] / 1e12:.1f} "
                f"TFLOP/s ({first['peak_matmul']})")
print("\n".join(rows))
EOF
echo "results: $dir"
exit "$failed"
