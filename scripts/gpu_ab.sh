#!/usr/bin/env bash
# Same-machine A/B of two builds: this checkout (B) against BASE (A: a git ref, or a folder with
# an older source tree). Builds both in place, runs the GPU tests on this checkout, then the
# throughput and the low-latency benchmarks of both, alternated (A, B, A, B) so that drift of the
# machine hits both alike. Logs and JSON under OUT_DIR (ab_summary.log: the tables side by side).
#
#   bash scripts/gpu_ab.sh BASE OUT_DIR
#   STEPS=build,throughput bash scripts/gpu_ab.sh HEAD~3 OUT_DIR
#
# Steps, run in the order given: build, tests, throughput, low_latency (default: all in this
# order); ROUNDS=N alternations of each
# benchmark (default 2). Each build is kept between runs
# (BASE under AB_WORK, default /tmp/swiftep_ab; this checkout in place), so a second run with
# STEPS=throughput does not rebuild. NVLink multicast stays off.
set -uo pipefail
BASE=${1:?usage: gpu_ab.sh BASE OUT_DIR}
OUT=${2:-gpu_ab_out}
STEPS=${STEPS:-build,tests,throughput,low_latency}
AB_WORK=${AB_WORK:-/tmp/swiftep_ab}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" "$AB_WORK"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-8}
eval "$(cd "$ROOT" && python3 -m torch_swiftep.launch --print-env)"
status=0
log() { echo "$*" | tee -a "$OUT/ab_summary.log"; }
run() {  # run NAME DIR CMD...: in DIR with PYTHONPATH=DIR, log to $OUT/NAME.log
  local name=$1 dir=$2; shift 2
  log "=== $name ($dir): $*"
  local t0=$SECONDS
  (cd "$dir" && PYTHONPATH="$dir" "$@") > "$OUT/$name.log" 2>&1
  local rc=$?
  log "=== $name: exit $rc after $((SECONDS - t0)) s"
  tail -n 40 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}

# The base tree: a folder as given, or a ref extracted from this checkout's git.
base_dir=$AB_WORK/base
if [ -d "$BASE" ]; then
  src=$(cd "$BASE" && pwd)
  if [ ! -f "$base_dir/.ab_source" ] || [ "$(cat "$base_dir/.ab_source")" != "$src" ]; then
    rm -rf "$base_dir" && mkdir -p "$base_dir" && cp -r "$src"/. "$base_dir"/
    echo "$src" > "$base_dir/.ab_source"
  fi
else
  rev=$(git -C "$ROOT" rev-parse "$BASE") || { echo "BASE $BASE: no such folder or ref"; exit 2; }
  if [ ! -f "$base_dir/.ab_source" ] || [ "$(cat "$base_dir/.ab_source")" != "$rev" ]; then
    rm -rf "$base_dir" && mkdir -p "$base_dir"
    git -C "$ROOT" archive "$rev" | tar -x -C "$base_dir"
    echo "$rev" > "$base_dir/.ab_source"
  fi
fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'
  echo "A (base): $(cat "$base_dir/.ab_source")"; echo "B (this checkout): $ROOT"; } \
  | tee -a "$OUT/ab_summary.log"

build() {  # both trees at once: each gets half the cores
  (cd "$base_dir" && python3 setup.py -q build_ext --inplace > "$OUT/build_A.log" 2>&1) &
  local pid_a=$!
  (cd "$ROOT" && python3 setup.py -q build_ext --inplace > "$OUT/build_B.log" 2>&1) &
  local pid_b=$!
  wait $pid_a || { log "build A failed"; tail -n 30 "$OUT/build_A.log"; exit 1; }
  wait $pid_b || { log "build B failed"; tail -n 30 "$OUT/build_B.log"; exit 1; }
  for side in A:"$base_dir" B:"$ROOT"; do
    (cd "${side#*:}" && PYTHONPATH="${side#*:}" python3 -c 'import torch_swiftep as t; assert t.CUDA_EXTENSION_ERROR is None, t.CUDA_EXTENSION_ERROR') \
      || { log "build ${side%%:*}: the extension does not load"; exit 1; }
  done
  log "built A and B"
}
bench() {  # bench KIND FLAG: A, B, A, B, ...
  local kind=$1 flag=$2
  for round in $(seq 1 "${ROUNDS:-2}"); do
    for side in A:"$base_dir" B:"$ROOT"; do
      local name="${kind}_${side%%:*}${round}"
      mkdir -p "$OUT/$name"
      run "$name" "${side#*:}" python3 -m torch_swiftep.bench "$flag" --no-check --out "$OUT/$name"
    done
  done
}
for step in ${STEPS//,/ }; do  # in the order STEPS lists them
  case $step in
    build) build ;;
    # the GPU tests of gpu_round.sh's tests step (the fuzz, with its 1001 cases, is a step of
    # its own there: under `-m gpu tests` its worlds would take turns on the GPU for an hour)
    tests) run tests_B "$ROOT" python3 -m pytest -q -p no:cacheprovider -rs --durations=15 \
             tests/test_gpu.py tests/test_gpu_failures.py ${PYTEST_ARGS:-} ;;
    throughput) bench throughput --throughput-only ;;
    low_latency) bench low_latency --low-latency-only ;;
    *) log "unknown step $step"; status=1 ;;
  esac
done
exit $status
