// The staging copy of both combines: copies expert_out's valid rows into a combine window when
// the experts did not write there directly (launched by launcher.cu beside it).
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "swiftep/params.h"

namespace swiftep {

// Threads of the staging copy kernel.
constexpr int kCopyThreads = 512;

// Copies the valid rows of each group from expert_out into the combine window (same pitch).
__global__ void __launch_bounds__(kCopyThreads)
    copy_rows_kernel(const __grid_constant__ CopyRowsParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int g = 0; g < p.num_groups; ++g) {
    const int64_t rows = max(int64_t{0}, min(static_cast<int64_t>(p.counts[g]), p.group_rows));
    const int64_t begin = g * p.group_rows * p.row_bytes;
    const int64_t bytes = rows * p.row_bytes;
    uint8_t* dst = p.dst + begin;
    const uint8_t* src = p.src + begin;
    const uint64_t bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                          static_cast<uint64_t>(bytes);
    if ((bits & 15) == 0) {
      for (int64_t i = thread; i < bytes / 16; i += stride)
        reinterpret_cast<int4*>(dst)[i] = reinterpret_cast<const int4*>(src)[i];
    } else {
      for (int64_t i = thread; i < bytes; i += stride) dst[i] = src[i];
    }
  }
}

}  // namespace swiftep
