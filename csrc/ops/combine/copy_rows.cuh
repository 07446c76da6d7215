// The staging copy of both combines: copies expert_out's valid rows into a combine window when
// the experts did not write there directly (launched by launcher.cu beside it).
//
// Two kernels. copy_rows_tma_kernel (16-byte aligned rows and pointers, the usual case): one
// thread per block drives a ring of bulk copies global -> shared -> global, which moves ~2.5x
// the bytes per SM that 512 threads of 16-byte loads and stores do (../HARDWARE: 48 vs 19 GB/s
// per SM on the H200), and the copy runs on the combine's few SMs. copy_rows_kernel: the
// element-wise fallback for anything else.
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "device/ptx.cuh"
#include "swiftep/params.h"

namespace swiftep {

// Threads of the fallback copy kernel.
constexpr int kCopyThreads = 512;
// The bulk copy's ring: kCopyStages chunks of kCopyChunkBytes in flight per block (the copy
// probe's best shape: 4 x 32 KiB per SM reaches the TMA copy ceiling).
constexpr int kCopyStages = 4;
constexpr int64_t kCopyChunkBytes = 32768;
constexpr int kCopyTmaThreads = 32;  // one warp; lane 0 issues every copy

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

// Walks the chunks of every group's valid bytes in order: chunk `chunk` of group `group`.
struct CopyCursor {
  int group = 0;
  int64_t chunk = 0;

  __device__ int64_t group_bytes(const CopyRowsParams& p) const {
    const int64_t rows = max(int64_t{0}, min(static_cast<int64_t>(p.counts[group]), p.group_rows));
    return rows * p.row_bytes;
  }
  // Moves `step` chunks on, skipping groups with fewer chunks left (empty ones too).
  __device__ void advance(const CopyRowsParams& p, int64_t step) {
    chunk += step;
    while (group < p.num_groups) {
      const int64_t chunks = ceil_div(group_bytes(p), kCopyChunkBytes);
      if (chunk < chunks) return;
      chunk -= chunks;
      ++group;
    }
  }
};

// Block b copies chunks b, b + grid, b + 2 grid, ... of the groups' concatenated valid bytes.
// Needs p.dst, p.src and p.row_bytes 16-byte aligned (so is every chunk); dynamic shared memory:
// kCopyStages * kCopyChunkBytes.
__global__ void __launch_bounds__(kCopyTmaThreads)
    copy_rows_tma_kernel(const __grid_constant__ CopyRowsParams p) {
  __shared__ __align__(8) uint64_t bars[kCopyStages];
  if (threadIdx.x != 0) return;
  uint8_t* ring = dynamic_smem();
  for (int s = 0; s < kCopyStages; ++s) mbarrier_init(&bars[s], 1);
  fence_mbarrier_init();
  uint8_t* stage_dst[kCopyStages];
  uint32_t stage_bytes[kCopyStages];
  CopyCursor load;
  load.advance(p, blockIdx.x);
  // Starts the load of the cursor's chunk into stage s; false when no chunk is left.
  auto issue = [&](int s) -> bool {
    if (load.group >= p.num_groups) return false;
    const int64_t offset = load.chunk * kCopyChunkBytes;
    const int64_t begin = load.group * p.group_rows * p.row_bytes + offset;
    const uint32_t bytes =
        static_cast<uint32_t>(min(kCopyChunkBytes, load.group_bytes(p) - offset));
    stage_dst[s] = p.dst + begin;
    stage_bytes[s] = bytes;
    mbarrier_arrive_expect_tx(&bars[s], bytes);
    tma_load_1d(ring + s * kCopyChunkBytes, p.src + begin, bytes, &bars[s]);
    load.advance(p, gridDim.x);
    return true;
  };
  int64_t issued = 0;
  while (issued < kCopyStages && issue(static_cast<int>(issued))) ++issued;
  for (int64_t i = 0; i < issued; ++i) {
    const int s = static_cast<int>(i % kCopyStages);
    mbarrier_wait_parity(&bars[s], static_cast<uint32_t>((i / kCopyStages) & 1));
    tma_store_1d(stage_dst[s], ring + s * kCopyChunkBytes, stage_bytes[s]);
    bulk_commit_group();
    bulk_wait_group_read<0>();  // the store has read stage s: refill it
    if (issue(s)) ++issued;
  }
  bulk_wait_group<0>();  // every store is complete before the kernel (and the copy) ends
}

}  // namespace swiftep
