#!/usr/bin/env bash
# One whole GPU round: build the extension, run the GPU tests, the fuzz, the sanitizers on small
# cases and the benchmark. Logs and results go under OUT_DIR (default: gpu_round_out).
#
#   bash scripts/gpu_round.sh OUT_DIR            # everything
#   STEPS=build,tests bash scripts/gpu_round.sh OUT_DIR
#   PYTEST_ARGS="-k missing_rank" STEPS=build,tests bash scripts/gpu_round.sh OUT_DIR
#   SWIFTEP_FUZZ_CASES=20 STEPS=fuzz bash scripts/gpu_round.sh OUT_DIR   # a quick fuzz
#
# Steps: build, tests, nvshmem (the scale-out transport: csrc/nvshmem built and linked against
# the NVSHMEM pip package, then 2-8 PEs as processes exchanging rows across virtual nodes, a PE
# that never sends named by the others, and the engine from Python: tests/test_nvshmem_link.py),
# scale_out (the Communicator with ranks_per_node < world: the hierarchical schedule over
# NVSHMEM, ranks as processes in virtual nodes: tests/test_gpu_scale_out.py),
# fuzz (tests/test_gpu_fuzz.py: >= 1000 random cases over worlds 2..8, both schedules; MPS=1 runs
# its processes concurrently), sanitize (memcheck and racecheck over cases that launch every
# kernel of both schedules), transformers (tests/test_transformers_gpu.py), bench, bench_quick.
# Not in the default list: sanitize_ranks (memcheck over 2 ranks as processes), pipeline (the
# pipelined layer at the DeepSeek-V3 and Qwen3-MoE shapes), pipeline_mp (that layer with 8 ranks
# as processes under MPS, both shapes, 4096 tokens/rank), deepep (scripts/build_deepep.sh:
# DeepEP's intranode build from its source in third_party/DeepEP, for multi_process),
# multi_process (ranks as processes on one GPU under MPS, DeepEP in the same run when built,
# DEEPEP_DIR), variants (scripts/combine_variants.sh: the combine's build variants timed with
# the reference check, then the default rebuilt). Steps run in this file's order, whatever the
# order of STEPS. NVLink multicast stays off: the environment comes from
# torch_swiftep.launch.NO_MULTICAST_ENV.
set -uo pipefail
OUT=${1:-gpu_round_out}
STEPS=${STEPS:-build,tests,nvshmem,scale_out,fuzz,sanitize,transformers,bench}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
env_lines=$(python3 -m torch_swiftep.launch --print-env 2> "$OUT/env.log") \
  || { cat "$OUT/env.log"; exit 1; }
eval "$env_lines"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
status=0
# An MPS daemon left running by an interrupted round would put every later step under MPS (the
# sanitizers refuse it, emulated worlds hang in it): steps that want it start it themselves.
echo quit | nvidia-cuda-mps-control > /dev/null 2>&1 && sleep 1
has() { [[ ",$STEPS," == *",$1,"* ]]; }
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failures, never stop the round
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$OUT/summary.log"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.log"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{ nvidia-smi; python3 -c 'import torch; print(torch.__version__, torch.version.cuda)'; } \
  > "$OUT/summary.log" 2>&1
if has build; then
  run build python3 -m pip install --no-build-isolation --no-deps -v -e . || exit 1
  python3 -c 'import torch_swiftep as t; assert t.CUDA_EXTENSION_ERROR is None, t.CUDA_EXTENSION_ERROR; print("extension loaded")' \
    2>&1 | tee -a "$OUT/summary.log" || exit 1
  # the extension must use the process's libstdc++, not a private static copy (setup.py)
  ldd torch_swiftep/_C*.so | grep -q "libstdc++" \
    || echo "WARNING: _C.so does not link libstdc++ dynamically (C++ error messages may crash)" \
    | tee -a "$OUT/summary.log"
fi
if has tests; then
  run tests python3 -m pytest -q -p no:cacheprovider -rs --durations=15 tests/test_gpu.py \
    tests/test_gpu_failures.py tests/test_gpu_pipeline.py tests/test_gpu_symmetric.py \
    ${PYTEST_ARGS:-}
fi
if has nvshmem; then
  run nvshmem python3 -m pytest -q -s -p no:cacheprovider -rs tests/test_nvshmem_link.py
  grep -E "exchange waited|gave up|passed|failed" "$OUT/nvshmem.log" | tee -a "$OUT/summary.log"
fi
if has scale_out; then  # the Communicator across virtual nodes, over NVSHMEM
  run scale_out python3 -m pytest -q -p no:cacheprovider -rs --durations=10 \
    tests/test_gpu_scale_out.py ${PYTEST_ARGS:-}
fi
# MPS=1: the fuzz's processes run under the MPS daemon (root), concurrently instead of taking
# turns on the GPU. The daemon is stopped again before the sanitizers (which refuse MPS).
mps_on() {
  nvidia-cuda-mps-control -d && echo "MPS daemon started" | tee -a "$OUT/summary.log"
}
mps_off() {
  echo quit | nvidia-cuda-mps-control 2> /dev/null && sleep 1
}
# The one-process emulated worlds stay outside MPS: their ranks are streams of one process that
# spin on each other, and under MPS (measured: world 3) a rank's kernel could wait behind
# another's spinning one until timeout_s.
fuzz() {
  local rc=0
  [ "${MPS:-0}" = 1 ] && mps_on
  python3 -m pytest -q -s -p no:cacheprovider -rs --durations=5 -m gpu tests/test_gpu_fuzz.py \
    -k fuzz_worlds || rc=1
  [ "${MPS:-0}" = 1 ] && mps_off
  python3 -m pytest -q -s -p no:cacheprovider -rs -m gpu tests/test_gpu_fuzz.py \
    -k "not fuzz_worlds" || rc=1
  return $rc
}
if has fuzz; then  # SWIFTEP_FUZZ_CASES (per world) and SWIFTEP_FUZZ_WORLDS pass through
  run fuzz fuzz
  grep -oE "fuzz: .*" "$OUT/fuzz.log" | tee -a "$OUT/summary.log"
fi
# The sanitized cases: test_gpu.py's small case and test_gpu_fuzz.py's kernel paths (every
# kernel: dispatch_layout, dispatch counts + data, both low-latency dispatch kernels, combine
# over both windows in bf16/fp16/fp32, the bulk staging copy; FP8 given and quantized; int32 and
# int64 indices). compute-sanitizer names no kernel when there is nothing to report, so the
# same cases first run once under the torch profiler, which lists the kernels they launch
# and fails if one is missing. The kernel-path case once timed out under memcheck at its first
# dispatch: its emulated ranks issued dispatch, expert and combine rank after rank, and the host
# blocked between two ranks' dispatches while the first spun. It now issues each phase for every
# rank before the next; if memcheck still cannot run it, the log says which case.
SANITIZED="small_case_for_sanitizers or emulated_world_kernel_paths"
sanitize() {
  local rc=0 tool
  echo "--- kernels the sanitized cases launch (torch profiler, no sanitizer)"
  SWIFTEP_LIST_KERNELS=1 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_fuzz.py \
    -k emulated_world_kernel_paths || rc=1
  for tool in memcheck racecheck; do
    echo "--- compute-sanitizer --tool $tool"
    SWIFTEP_GPU_SMALL_CASE=1 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_fuzz.py \
      -k "$SANITIZED" || rc=1
  done
  return $rc
}
if has sanitize; then
  run sanitize sanitize
  grep -oE "kernels?: .*|(ERROR|RACECHECK) SUMMARY.*|[0-9]+ (passed|failed).*" \
    "$OUT/sanitize.log" | tee -a "$OUT/summary.log"
fi
# sanitize_ranks (opt-in): memcheck over ranks as processes (no in-process emulation, so nothing
# waits behind a serialized kernel): the 2-rank reference test (every dispatch and combine kernel,
# staged and zero-copy, FP8 given and quantized), dispatch_layout, and the symmetric combine
# (its kernel reads the owners' rows through the segment table: in place and staged, mixed).
# Slow: processes take turns and memcheck instruments every access.
if has sanitize_ranks; then
  run sanitize_ranks compute-sanitizer --tool memcheck --target-processes all --error-exitcode 9 \
    python3 -m pytest -q -p no:cacheprovider "tests/test_gpu.py::test_cuda_matches_reference[2]" \
    tests/test_gpu.py::test_dispatch_layout_matches_cpu_and_rejects_bad_indices \
    "tests/test_gpu_symmetric.py::test_symmetric_combine_matches_reference_and_plain_combine[2]"
  grep -oE "ERROR SUMMARY.*|[0-9]+ (passed|failed).*" "$OUT/sanitize_ranks.log" \
    | tee -a "$OUT/summary.log"
fi
if has transformers; then
  run transformers python3 -m pytest -q -p no:cacheprovider -rs tests/test_transformers_gpu.py
fi
if has bench; then
  run bench python3 -m torch_swiftep.bench --out "$OUT"
fi
if has bench_quick; then
  run bench_quick python3 -m torch_swiftep.bench --quick --out "$OUT"
fi
if has pipeline; then
  for shape in deepseek-v3 qwen3-moe; do
    mkdir -p "$OUT/pipeline_$shape"
    run "pipeline_$shape" python3 -m torch_swiftep.bench.pipeline_layer --shape "$shape" \
      --tokens 4096 --out "$OUT/pipeline_$shape"
  done
fi
# multi_process (opt-in): ranks as processes, rank r on GPU r % GPUs (several on one GPU run side
# by side under the MPS daemon, stopped again after; MP_ARGS="--world 2" on a 2-GPU host gives
# each rank its own); DeepEP's intranode build on PYTHONPATH when there is one (DEEPEP_DIR,
# default third_party/deepep_intranode, from scripts/build_deepep.sh). MP_ARGS: more flags for
# the benchmark, e.g. MP_ARGS="--sms 4,8,16".
multi_process() {
  local rc=0 deepep=${DEEPEP_DIR:-third_party/deepep_intranode} pypath=${PYTHONPATH:-}
  if [ -d "$deepep" ]; then
    pypath="$(cd "$deepep" && pwd)${pypath:+:$pypath}"
  else
    echo "no DeepEP build at $deepep (scripts/build_deepep.sh): DeepEP's columns stay empty"
  fi
  mps_on
  ( if [ -n "$pypath" ]; then export PYTHONPATH="$pypath"; fi
    python3 -m torch_swiftep.bench.multi_process --timeout "${TIMEOUT:-500}" \
      --out "$OUT/multi_process" ${MP_ARGS:-} ) || rc=1
  mps_off
  return $rc
}
if has deepep; then
  run deepep bash scripts/build_deepep.sh "${DEEPEP_DIR:-third_party/deepep_intranode}"
fi
if has multi_process; then
  run multi_process multi_process
fi
if has variants; then
  run variants bash scripts/combine_variants.sh "$OUT/variants"
fi
# pipeline_mp (opt-in): bench/pipeline_multi_process.py, the ranks side by side under the MPS
# daemon (stopped again after); rank r runs on GPU r % GPUs, so on a multi-GPU host
# PIPELINE_ARGS="--world 2 --experts 64 --sms 8,16,24,32" gives each rank a GPU of its own
# (64 experts: an EP8 DeepSeek-V3 rank's 32 each; flags there override those below).
# PIPELINE_SHAPES picks the shapes (one per command keeps a command short); TIMEOUT bounds each.
if has pipeline_mp; then
  mps_on
  for shape in ${PIPELINE_SHAPES:-deepseek-v3 qwen3-moe}; do
    run "pipeline_mp_$shape" python3 -m torch_swiftep.bench.pipeline_multi_process --world 8 \
      --shape "$shape" --tokens 4096 --timeout "${TIMEOUT:-500}" \
      --out "$OUT/pipeline_mp_$shape" ${PIPELINE_ARGS:-}
  done
  mps_off
fi
exit $status
