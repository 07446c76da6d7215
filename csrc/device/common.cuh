// Device internals: small helpers every op's kernels share: warp constants, the dynamic shared
// memory, index loads, a block scan, a plain warp copy for rows TMA cannot address, per-warp
// mbarrier setup and the block-done (last block) pattern.
#pragma once

#include <cstdint>

#include "device/ctrl.cuh"
#include "device/ptx.cuh"
#include "device/wait.cuh"

namespace swiftep {

constexpr int kWarpSize = 32;
constexpr uint32_t kFullMask = 0xffffffffu;
// Bulk copies need 16-byte aligned addresses and sizes that are multiples of 16.
constexpr int64_t kBulkAlign = 16;
// Shared-memory stage buffers start on 128-byte boundaries (bank-conflict free, TMA friendly).
constexpr int64_t kSmemAlign = 128;
// Most warps a block may have (1024 threads): sizes the per-warp static shared arrays.
constexpr int kMaxWarpsPerBlock = 32;

// The dynamic shared memory of every kernel (one declaration, so all kernels agree on its type).
__device__ __forceinline__ uint8_t* dynamic_smem() {
  extern __shared__ __align__(128) uint8_t swiftep_dynamic_smem[];
  return swiftep_dynamic_smem;
}

__host__ __device__ __forceinline__ int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename IdxT>
__device__ __forceinline__ int64_t load_index(const void* topk_idx, int64_t i) {
  return static_cast<int64_t>(static_cast<const IdxT*>(topk_idx)[i]);
}

__device__ __forceinline__ bool is_expert(int64_t e, int num_experts) {
  return e >= 0 && e < num_experts;
}

__device__ __forceinline__ int warp_id() { return threadIdx.x / kWarpSize; }
__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarpSize; }

// In-place exclusive scan of data[0, n) in shared memory by the whole block; returns the total
// to every thread. Each thread scans a contiguous piece serially, warps combine by shuffles.
// scratch: kMaxWarpsPerBlock ints of shared memory. Ends with a barrier (data and scratch reusable).
__device__ __forceinline__ int block_exclusive_scan(int* data, int n, int* scratch) {
  const int num_threads = blockDim.x;
  const int per_thread = static_cast<int>(ceil_div(n, num_threads));
  const int begin = min(n, static_cast<int>(threadIdx.x) * per_thread);
  const int end = min(n, begin + per_thread);
  int sum = 0;
  for (int i = begin; i < end; ++i) sum += data[i];
  // Inclusive scan of per-thread sums within the warp.
  int inclusive = sum;
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const int other = __shfl_up_sync(kFullMask, inclusive, delta);
    if (lane_id() >= delta) inclusive += other;
  }
  const int num_warps = num_threads / kWarpSize;
  if (lane_id() == kWarpSize - 1) scratch[warp_id()] = inclusive;
  __syncthreads();
  if (warp_id() == 0) {
    int total = lane_id() < num_warps ? scratch[lane_id()] : 0;
    for (int delta = 1; delta < kWarpSize; delta *= 2) {
      const int other = __shfl_up_sync(kFullMask, total, delta);
      if (lane_id() >= delta) total += other;
    }
    if (lane_id() < num_warps) scratch[lane_id()] = total;  // inclusive over warps
  }
  __syncthreads();
  int running = (warp_id() > 0 ? scratch[warp_id() - 1] : 0) + inclusive - sum;
  for (int i = begin; i < end; ++i) {
    const int value = data[i];
    data[i] = running;
    running += value;
  }
  const int total = scratch[num_warps - 1];
  __syncthreads();
  return total;
}

// Copies `bytes` from src to dst with the lanes of one warp, in the widest unit both addresses
// and the size allow. For rows a bulk copy cannot take (unaligned); plain stores, any memory.
__device__ __forceinline__ void warp_copy_bytes(uint8_t* dst, const uint8_t* src, int64_t bytes,
                                                int lane) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                        static_cast<uint64_t>(bytes);
  if ((bits & 15) == 0) {
    for (int64_t i = lane; i < bytes / 16; i += kWarpSize)
      reinterpret_cast<int4*>(dst)[i] = reinterpret_cast<const int4*>(src)[i];
  } else if ((bits & 3) == 0) {
    for (int64_t i = lane; i < bytes / 4; i += kWarpSize)
      reinterpret_cast<int32_t*>(dst)[i] = reinterpret_cast<const int32_t*>(src)[i];
  } else {
    for (int64_t i = lane; i < bytes; i += kWarpSize) dst[i] = src[i];
  }
}

// Lane 0 of every warp initialises its warp's mbarriers (one arrival
// per phase: lane 0's arrive_expect_tx). Whole warp.
__device__ __forceinline__ void init_warp_barriers(uint64_t* bars, int count) {
  if (lane_id() == 0) {
    for (int s = 0; s < count; ++s) mbarrier_init(bars + s, 1);
    fence_mbarrier_init();
  }
  __syncwarp();
}

// The last-block-done pattern. Every thread fences its writes (own and peers' memory) at system
// scope, the block counts itself done, and the last block to arrive (the counter returns
// grid - 1) resets the counter for the next launch and returns true to all of its threads.
// The last block's threads then fence again, so everything the other blocks wrote is ordered
// before whatever release the caller performs next.
__device__ __forceinline__ bool block_done_is_last(const CommParams& c, int done_slot) {
  __shared__ int is_last;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t* counter = ctrl_blocks_done(c) + done_slot;
    const int previous = atomicAdd(counter, 1);
    is_last = previous == static_cast<int>(gridDim.x) - 1;
    if (is_last) {
      __threadfence();
      *counter = 0;  // the next launch (later in stream order) starts from zero
    }
  }
  __syncthreads();
  if (!is_last) return false;
  __threadfence_system();
  return true;
}

}  // namespace swiftep
