// Launcher of the local swiglu_rows op: one grid-stride kernel, no shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "ops/launch_utils.h"
#include "ops/swiglu_rows/kernel.cuh"
#include "swiftep/launchers.h"

namespace swiftep {

namespace {
constexpr int kSwigluThreads = 256;
// Blocks per SM of the grid: enough loads in flight to stream HBM from a grid-stride loop. The
// grid never depends on the row count (the host does not know it).
constexpr int kSwigluBlocksPerSm = 8;

template <typename T>
cudaError_t launch_typed(const SwigluRowsParams& p, int blocks, cudaStream_t stream) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  const bool vectorized = p.width % kVec == 0 &&
                          (reinterpret_cast<uintptr_t>(p.gate_up) & 15) == 0 &&
                          (reinterpret_cast<uintptr_t>(p.out) & 15) == 0;
  if (vectorized) {
    swiglu_rows_kernel<T, kVec><<<blocks, kSwigluThreads, 0, stream>>>(p);
  } else {
    swiglu_rows_kernel<T, 1><<<blocks, kSwigluThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}
}  // namespace

LaunchResult launch_swiglu_rows(const SwigluRowsParams& params, cudaStream_t stream) {
  if (params.num_row_ends < 1 || params.width < 0 || params.rows < 0)
    return launch_result(cudaErrorInvalidValue);
  if (params.rows == 0 || params.width == 0) return launch_result(cudaSuccess);
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return launch_result(err);
  const int blocks = sms * kSwigluBlocksPerSm;
  switch (params.dtype) {
    case DType::kBFloat16: return launch_result(launch_typed<__nv_bfloat16>(params, blocks, stream));
    case DType::kFloat16: return launch_result(launch_typed<__half>(params, blocks, stream));
    case DType::kFloat32: return launch_result(launch_typed<float>(params, blocks, stream));
  }
  return launch_result(cudaErrorInvalidValue);
}

}  // namespace swiftep
