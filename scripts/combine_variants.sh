#!/usr/bin/env bash
# Builds the extension once per combine tuning variant and times each with the throughput
# benchmark (8 emulated ranks, 4 SMs each). Usage: bash scripts/combine_variants.sh OUT_DIR
set -uo pipefail
OUT=${1:-variants_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
for flags in "-DSWIFTEP_COMBINE_WARPS=8" "-DSWIFTEP_COMBINE_WARPS=4" \
             "-DSWIFTEP_COMBINE_WARPS=2 -DSWIFTEP_COMBINE_MAX_CHUNK=8192" \
             "-DSWIFTEP_COMBINE_WARPS=4 -DSWIFTEP_COMBINE_STAGES=3"; do
  echo "=== variant: $flags"
  SWIFTEP_NVCC_FLAGS="$flags" python3 setup.py -q build_ext --inplace --force > "$OUT/build.log" 2>&1 \
    || { tail -20 "$OUT/build.log"; continue; }
  python3 -m torch_swiftep.bench --quick --throughput-only --no-check 2>&1 | grep -E "combine|dispatch" | head -2
done
