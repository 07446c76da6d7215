#!/usr/bin/env bash
# Builds the extension once per combine tuning variant and times each with the throughput
# benchmark (torch_swiftep/bench/throughput_emulated.py: 8 emulated ranks, 4 SMs each), or with
# BENCH, a bash command line whose output has the benchmark tables' rows and its check line
# (FILTER: the extended regex of the lines kept, ROWS: how many).
# Usage: bash scripts/combine_variants.sh OUT_DIR
# combine_partials' kernels on a 2-GPU host (docs/perf-notes.md, v7):
#   VARIANTS="-DSWIFTEP_PARTIALS_UNROLL=2
#   -DSWIFTEP_PARTIALS_SLOTS=4 -DSWIFTEP_PARTIALS_UNROLL=4" \
#   BENCH="python3 -m torch_swiftep.bench.multi_process --world 2 --sms 8,16,24 --peers none \
#   --fanout --partials" ROWS=24 bash scripts/combine_variants.sh OUT_DIR
# Each reduce's shape by its row count against the fixed shapes before it (v10), per kernel and
# for one chunk of experts (kernel_times' output digest: the same bits from both builds):
#   VARIANTS="-DSWIFTEP_COMBINE_SHAPE_BY_ROWS=1
#   -DSWIFTEP_COMBINE_SHAPE_BY_ROWS=0" FILTER="ms |rank|check" ROWS=400 \
#   BENCH="python3 -m torch_swiftep.bench.kernel_times --world 2 --sms 8,16 --groups 1,2,4 \
#   --fanout --partials; python3 -m torch_swiftep.bench.kernel_times --world 2 --sms 8,16 \
#   --groups 1,2,4 --fanout" bash scripts/combine_variants.sh OUT_DIR
set -uo pipefail
OUT=${1:-variants_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
# VARIANTS: one set of nvcc flags per line (default: the register-load combine as built, at
# 8 warps per block, and the staged TMA combine it replaced).
VARIANTS=${VARIANTS:-"-DSWIFTEP_COMBINE_LDG_WARPS=16
-DSWIFTEP_COMBINE_LDG_WARPS=8
-DSWIFTEP_COMBINE_LDG=0"}
while IFS= read -r flags; do
  [ -n "$flags" ] || continue
  echo "=== variant: $flags"
  SWIFTEP_NVCC_FLAGS="$flags" python3 setup.py -q build_ext --inplace --force > "$OUT/build.log" 2>&1 \
    || { tail -20 "$OUT/build.log"; continue; }
  # the table's rows (throughput_emulated.py) and the reference check: a variant that computes
  # something else must not look fast
  bash -c "${BENCH:-python3 -m torch_swiftep.bench --quick --throughput-only}" 2>&1 \
    | grep -E "${FILTER:-^ *(dispatch|combine)|check}" | head -"${ROWS:-8}"
done <<< "$VARIANTS"
echo "=== rebuilding the default"
python3 setup.py -q build_ext --inplace --force > "$OUT/build.log" 2>&1
