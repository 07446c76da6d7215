// Throughput dispatch with dispatch_fanout, phase 3 (after the data kernel, which returns once
// every peer's rows are here): copy each token's row into the token's other rows on this rank.
// A peer wrote a token's row only into the lowest of that token's rows here (sender_writes_row,
// ops/send/units.cuh) and its metadata (recv_src) into every one, so this rank finds the copies
// from recv_src alone, with no list from the senders:
//   1. fanout_lowest_kernel: every row from a peer offers itself to its (source rank, token)'s
//      slot of the fanout_rows region: atomicMax of epoch << 32 | ~row, so the slot ends up
//      holding this call's lowest row (a slot left by an older call has a lower epoch and loses;
//      the region never needs clearing);
//   2. fanout_copy_kernel: every other row of that (source, token) is copied from it, one warp
//      per copy with a bulk load and a bulk store through its shared-memory buffer.
// Rows from this rank were all written by its own data kernel: both kernels skip them. When a
// sender wrote every row (a call small enough to send one slot per unit), the copies rewrite
// rows with the bytes they already hold.
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "device/ctrl.cuh"
#include "device/ptx.cuh"
#include "swiftep/params.h"

namespace swiftep {

constexpr int kFanoutLowestThreads = 512;
constexpr int kFanoutCopyWarps = 8;
constexpr int64_t kFanoutChunkBytes = 16384;  // one warp's shared buffer

// Rows of this call's window: the counts phase's expert offsets (clamped: an overflowing call
// has already failed with a capacity status).
__device__ __forceinline__ int64_t fanout_window_rows(const DispatchParams& p) {
  const int64_t rows = p.expert_offsets[p.comm.num_local_experts];
  return rows < p.comm.capacity ? rows : p.comm.capacity;
}

// The (source rank, token) slot of a row from a peer, or -1 for this rank's own rows.
__device__ __forceinline__ int64_t fanout_slot(const DispatchParams& p, int64_t row) {
  const int2 src = at_offset<const int2>(p.comm.workspace, p.comm.off_recv_src)[row];
  if (src.x == p.comm.rank) return -1;
  return static_cast<int64_t>(src.x) * p.comm.max_tokens_per_rank + src.y;
}

__global__ void __launch_bounds__(kFanoutLowestThreads)
    fanout_lowest_kernel(const __grid_constant__ DispatchParams p) {
  const uint64_t epoch = static_cast<uint64_t>(ctrl_epoch(p.comm)[kEpochThroughput]);
  auto* lowest = at_offset<unsigned long long>(p.comm.workspace, p.comm.off_fanout_rows);
  const int64_t rows = fanout_window_rows(p);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += stride) {
    const int64_t slot = fanout_slot(p, r);
    if (slot >= 0) atomicMax(lowest + slot, (epoch << 32) | (0xffffffffull - r));
  }
}

// Dynamic shared memory: kFanoutCopyWarps * kFanoutChunkBytes. Warp w takes rows in batches of
// 32 (one per lane), each lane finds whether its row is a copy and of which row, and the warp
// copies the batch's copies one after the other (lane 0 drives the bulk copies, or the whole
// warp copies with vector loads and stores when the pitch is not a 16-byte multiple).
__global__ void __launch_bounds__(kFanoutCopyWarps * kWarpSize)
    fanout_copy_kernel(const __grid_constant__ DispatchParams p) {
  __shared__ __align__(8) uint64_t bars[kFanoutCopyWarps];
  const int lane = lane_id();
  const int warp = warp_id();
  uint8_t* buffer = dynamic_smem() + warp * kFanoutChunkBytes;
  init_warp_barriers(&bars[warp], 1);
  const auto* lowest = at_offset<const unsigned long long>(p.comm.workspace,
                                                           p.comm.off_fanout_rows);
  uint8_t* window = at_offset<uint8_t>(p.comm.workspace, p.comm.off_recv_x);
  const int64_t pitch = p.out_row_bytes;
  const bool bulk = pitch % 16 == 0;
  const int64_t rows = fanout_window_rows(p);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kFanoutCopyWarps;
  uint32_t uses = 0;  // completed phases of this warp's mbarrier
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kFanoutCopyWarps + warp) * kWarpSize;
       base < rows; base += warps * kWarpSize) {
    const int64_t r = base + lane;
    int64_t from = -1;
    if (r < rows) {
      const int64_t slot = fanout_slot(p, r);
      if (slot >= 0) {
        const int64_t first = 0xffffffffll - static_cast<int64_t>(lowest[slot] & 0xffffffffull);
        if (first != r) from = first;
      }
    }
    for (uint32_t todo = __ballot_sync(kFullMask, from >= 0); todo != 0; todo &= todo - 1) {
      const int i = __ffs(todo) - 1;
      const uint8_t* src = window + __shfl_sync(kFullMask, from, i) * pitch;
      uint8_t* dst = window + (base + i) * pitch;
      if (!bulk) {
        warp_copy_bytes(dst, src, pitch, lane);
        continue;
      }
      if (lane == 0) {
        for (int64_t offset = 0; offset < pitch; offset += kFanoutChunkBytes) {
          const uint32_t bytes = static_cast<uint32_t>(min(kFanoutChunkBytes, pitch - offset));
          mbarrier_arrive_expect_tx(&bars[warp], bytes);
          tma_load_1d(buffer, src + offset, bytes, &bars[warp]);
          mbarrier_wait_parity(&bars[warp], uses & 1);
          ++uses;
          tma_store_1d(dst + offset, buffer, bytes);
          bulk_commit_group();
          bulk_wait_group_read<0>();  // the store has read the buffer: it may be refilled
        }
      }
      __syncwarp();
    }
  }
  if (lane == 0) bulk_wait_group<0>();  // every copy is complete when the kernel ends
}

}  // namespace swiftep
