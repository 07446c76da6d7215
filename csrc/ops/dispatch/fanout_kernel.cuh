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
constexpr int64_t kFanoutWarpBytes = 16384;  // one warp's shared memory: two chunk buffers
constexpr int64_t kFanoutChunkBytes = kFanoutWarpBytes / 2;

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

// Lane 0's walk over one batch's copies, chunk by chunk: lane i's row (base + i) is copied from
// row from[i] (-1: lane i has no copy), in lane order.
struct FanoutChunks {
  const int64_t* from;  // [kWarpSize] in shared memory
  const uint8_t* window;
  int64_t base, pitch;
  int lane = -1;
  int64_t offset = 0;

  __device__ bool next(const uint8_t** src, uint8_t** dst, uint32_t* bytes) {
    offset += kFanoutChunkBytes;
    if (lane < 0 || offset >= pitch) {  // the next lane with a copy
      offset = 0;
      do {
        ++lane;
      } while (lane < kWarpSize && from[lane] < 0);
      if (lane >= kWarpSize) return false;
    }
    *src = window + from[lane] * pitch + offset;
    *dst = const_cast<uint8_t*>(window) + (base + lane) * pitch + offset;
    *bytes = static_cast<uint32_t>(min(kFanoutChunkBytes, pitch - offset));
    return true;
  }
};

// Lane 0 streams a batch's chunks through the warp's two buffers: the load of chunk c + 1 is
// in flight while chunk c is waited for and stored (with one buffer, every chunk's load waited
// for the previous chunk's store to have read the buffer: one HBM round trip per chunk, not
// overlapped). phases: bit b = the parity buffer b's mbarrier waits for next.
__device__ __forceinline__ void fanout_stream_chunks(FanoutChunks chunks, uint8_t* buffers,
                                                     uint64_t* bars, uint32_t* phases) {
  const uint8_t* src;
  uint8_t* dst;
  uint32_t bytes;
  bool have = chunks.next(&src, &dst, &bytes);
  int b = 0;
  if (have) {
    mbarrier_arrive_expect_tx(&bars[b], bytes);
    tma_load_1d(buffers, src, bytes, &bars[b]);
  }
  while (have) {
    const uint8_t* next_src;
    uint8_t* next_dst;
    uint32_t next_bytes;
    const bool more = chunks.next(&next_src, &next_dst, &next_bytes);
    if (more) {  // the other buffer's last store (chunk c - 1) must have read it
      bulk_wait_group_read<0>();
      mbarrier_arrive_expect_tx(&bars[b ^ 1], next_bytes);
      tma_load_1d(buffers + (b ^ 1) * kFanoutChunkBytes, next_src, next_bytes, &bars[b ^ 1]);
    }
    mbarrier_wait_parity(&bars[b], (*phases >> b) & 1);
    *phases ^= 1u << b;
    tma_store_1d(dst, buffers + b * kFanoutChunkBytes, bytes);
    bulk_commit_group();
    src = next_src;
    dst = next_dst;
    bytes = next_bytes;
    have = more;
    b ^= 1;
  }
  bulk_wait_group_read<0>();  // both buffers free for the next batch
}

// Dynamic shared memory: kFanoutCopyWarps * kFanoutWarpBytes. Warp w takes rows in batches of
// 32 (one per lane), each lane finds whether its row is a copy and of which row, and lane 0
// streams the batch's copies through the warp's two buffers (or, when the pitch is not a 16-byte
// multiple, the whole warp copies each row with vector loads and stores).
__global__ void __launch_bounds__(kFanoutCopyWarps * kWarpSize)
    fanout_copy_kernel(const __grid_constant__ DispatchParams p) {
  __shared__ __align__(8) uint64_t bars[kFanoutCopyWarps][2];
  __shared__ int64_t copy_from[kFanoutCopyWarps][kWarpSize];
  const int lane = lane_id();
  const int warp = warp_id();
  uint8_t* buffers = dynamic_smem() + warp * kFanoutWarpBytes;
  init_warp_barriers(bars[warp], 2);
  const auto* lowest = at_offset<const unsigned long long>(p.comm.workspace,
                                                           p.comm.off_fanout_rows);
  uint8_t* window = at_offset<uint8_t>(p.comm.workspace, p.comm.off_recv_x);
  const int64_t pitch = p.out_row_bytes;
  const bool bulk = pitch % 16 == 0;
  const int64_t rows = fanout_window_rows(p);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kFanoutCopyWarps;
  uint32_t phases = 0;  // lane 0's: the next parity of each buffer's mbarrier
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
    if (!bulk) {
      for (uint32_t todo = __ballot_sync(kFullMask, from >= 0); todo != 0; todo &= todo - 1) {
        const int i = __ffs(todo) - 1;
        warp_copy_bytes(window + (base + i) * pitch,
                        window + __shfl_sync(kFullMask, from, i) * pitch, pitch, lane);
      }
      continue;
    }
    copy_from[warp][lane] = from;
    __syncwarp();
    if (lane == 0) {
      fanout_stream_chunks(FanoutChunks{copy_from[warp], window, base, pitch}, buffers,
                           bars[warp], &phases);
    }
    __syncwarp();  // copy_from is read before the next batch overwrites it
  }
  if (lane == 0) bulk_wait_group<0>();  // every copy is complete when the kernel ends
}

}  // namespace swiftep
