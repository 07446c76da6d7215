// Launcher of the local dispatch_layout op (one grid-stride kernel, no shared memory).
#include <cuda_runtime_api.h>

#include "ops/dispatch_layout/kernel.cuh"
#include "ops/launch_utils.h"
#include "swiftep/launchers.h"

namespace swiftep {

namespace {
// One thread per token; the grid-stride loop covers any count with a bounded grid.
constexpr int kLayoutThreads = 256;
constexpr int64_t kMaxLayoutBlocks = 1024;
}  // namespace

LaunchResult launch_dispatch_layout(const LayoutParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0) return launch_result(cudaSuccess);
  if (params.world_size <= 0 || params.num_experts % params.world_size != 0)
    return launch_result(cudaErrorInvalidValue);
  int64_t blocks = ceil_div(params.num_tokens, kLayoutThreads);
  if (blocks > kMaxLayoutBlocks) blocks = kMaxLayoutBlocks;
  if (params.topk_idx_is_int64) {
    dispatch_layout_kernel<int64_t>
        <<<static_cast<unsigned>(blocks), kLayoutThreads, 0, stream>>>(params);
  } else {
    dispatch_layout_kernel<int32_t>
        <<<static_cast<unsigned>(blocks), kLayoutThreads, 0, stream>>>(params);
  }
  return launch_result(cudaGetLastError());
}

}  // namespace swiftep
