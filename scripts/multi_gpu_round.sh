#!/usr/bin/env bash
# The multi-GPU round (one process per GPU, NVLink): machine record, build, GPU tests,
# benchmark against NCCL, ranks as processes beside DeepEP, the pipelined layer, the scale-out
# row counts and the NVSHMEM transport (its build and link check, then PEs exchanging rows
# across virtual nodes, one per GPU: tests/test_nvshmem_link.py).
# Logs under OUT_DIR. Usage: bash scripts/multi_gpu_round.sh OUT_DIR
# NVLink multicast stays off: the environment comes from torch_swiftep.launch.NO_MULTICAST_ENV.
set -uo pipefail
OUT=${1:-multi_gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
env_lines=$(python3 -m torch_swiftep.launch --print-env 2> "$OUT/env.log") \
  || { cat "$OUT/env.log"; exit 1; }
eval "$env_lines"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-32}
status=0
{ nvidia-smi; nvidia-smi topo -m; python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count(), "GPUs")'; } \
  > "$OUT/machine.log" 2>&1
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
# ranks of the GPU tests land on GPU (rank % GPU count): one process per GPU
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -5 "$OUT/gpu_tests.log"
python3 -m torch_swiftep.bench.multi_gpu_vs_nccl --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# Ranks as processes, one per GPU, beside DeepEP when its build is there (DEEPEP_DIR, from
# scripts/build_deepep.sh), and the pipelined layer at both shapes with each rank holding an EP8
# rank's experts (docs/pipelining.md)
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
deepep=${DEEPEP_DIR:-third_party/deepep_intranode}
( [ -d "$deepep" ] && export PYTHONPATH="$(cd "$deepep" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
  python3 -m torch_swiftep.bench.multi_process --world "$gpus" --sms 8,16,24 --peers deepep \
    --out "$OUT/multi_process" ) > "$OUT/multi_process.log" 2>&1 || status=1
grep -v "capturing\|replaying" "$OUT/multi_process.log" | tail -30
python3 -m torch_swiftep.bench.multi_process --world "$gpus" --sms 8,16,24 --peers none \
  --fanout --out "$OUT/multi_process_fanout" > "$OUT/multi_process_fanout.log" 2>&1 || status=1
grep -E "^ +dispatch|check:" "$OUT/multi_process_fanout.log"
# (chunks of tokens, bit-identical; then chunks of experts with combine_partials, the variant
# with the smallest per-chunk cost on 2 GPUs)
for shape in deepseek-v3:32 qwen3-moe:16; do
  for variant in tokens experts; do
    name="pipeline_${shape%:*}_$variant"
    flags=(--split "$variant")
    [ "$variant" = experts ] && flags+=(--partials)
    python3 -m torch_swiftep.bench.pipeline_multi_process --world "$gpus" --shape "${shape%:*}" \
      --experts $((gpus * ${shape#*:})) --sms 8,16,24,32 "${flags[@]}" --out "$OUT/$name" \
      > "$OUT/$name.log" 2>&1 || status=1
    tail -22 "$OUT/$name.log"
  done
done
# Scale-out: the rows that cross virtual node boundaries (2 nodes of this machine's GPUs), and
# the NVSHMEM transport: build, link check, one-PE round trip, then 2-8 PEs (PE r on GPU
# r % GPUs) exchanging rows across virtual nodes and the engine from Python (csrc/nvshmem), then
# the Communicator across virtual nodes (the hierarchical schedule over NVSHMEM, ranks r on GPU
# r % GPUs: tests/test_gpu_scale_out.py, worlds 2x2, 2x4, 4x2 and a missing rank).
python3 -m torch_swiftep.bench.scale_out > "$OUT/scale_out.log" 2>&1 || status=1
tail -12 "$OUT/scale_out.log"
python3 -m pytest -q -s -p no:cacheprovider -rs tests/test_nvshmem_link.py \
  > "$OUT/nvshmem.log" 2>&1 || status=1
tail -8 "$OUT/nvshmem.log"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_scale_out.py \
  > "$OUT/scale_out_tests.log" 2>&1 || status=1
tail -8 "$OUT/scale_out_tests.log"
exit $status
