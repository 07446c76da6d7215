#!/usr/bin/env bash
# The multi-GPU round (one process per GPU, NVLink): machine record, build, GPU tests,
# benchmark against NCCL. Logs under OUT_DIR. Usage: bash scripts/multi_gpu_round.sh OUT_DIR
# NVLink multicast stays off: on shared hosts a program using it can take the GPUs down.
set -uo pipefail
OUT=${1:-multi_gpu_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-32}
cd "$(dirname "$0")/.."
status=0
{ nvidia-smi; nvidia-smi topo -m; python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count(), "GPUs")'; } \
  > "$OUT/machine.log" 2>&1
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
# ranks of the GPU tests land on GPU (rank % GPU count): one process per GPU
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -5 "$OUT/gpu_tests.log"
python3 -m torch_swiftep.bench.multi_gpu --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
