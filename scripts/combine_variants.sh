#!/usr/bin/env bash
# Builds the extension once per combine tuning variant and times each with the throughput
# benchmark (torch_swiftep/bench/throughput_emulated.py: 8 emulated ranks, 4 SMs each).
# Usage: bash scripts/combine_variants.sh OUT_DIR
set -uo pipefail
OUT=${1:-variants_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
for flags in "-DSWIFTEP_COMBINE_WARPS=8" "-DSWIFTEP_COMBINE_WARPS=4" \
             "-DSWIFTEP_COMBINE_WARPS=2 -DSWIFTEP_COMBINE_MAX_CHUNK=8192" \
             "-DSWIFTEP_COMBINE_WARPS=4 -DSWIFTEP_COMBINE_STAGES=3"; do
  echo "=== variant: $flags"
  SWIFTEP_NVCC_FLAGS="$flags" python3 setup.py -q build_ext --inplace --force > "$OUT/build.log" 2>&1 \
    || { tail -20 "$OUT/build.log"; continue; }
  # the table's dispatch and combine rows (throughput_emulated.py), not the progress lines
  python3 -m torch_swiftep.bench --quick --throughput-only --no-check 2>&1 \
    | grep -E "^ *(dispatch|combine) " | head -2
done
