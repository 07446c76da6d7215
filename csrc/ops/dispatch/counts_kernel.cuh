// Throughput dispatch, phase 1: the counts kernel (one block). It counts this rank's pairs per
// expert, all-gathers the count matrix, and ranks every own pair to its destination row (the
// data kernel, data_kernel.cuh beside it, then sends the rows). The low-latency kernel ranks
// only a block's own pairs, its own way (ops/low_latency_dispatch/kernel.cuh).
//
// Row order inside an expert is (source rank, source token, topk slot). On one source, the
// (token, slot) pairs in flat order p = token * K + slot are split into contiguous ranges, one
// per warp; a pair's rank among this source's pairs of its expert is
//   (pairs of that expert in earlier warps' ranges) + (earlier pairs of it in its own range),
// the first from per-warp shared-memory histograms scanned over warps, the second from
// __match_any_sync over each batch of 32 pairs.
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "swiftep/params.h"

namespace swiftep {

// ---------------------------------------------------------------------------- pair ranking
// Batches of 32 pairs whose indices a warp loads at once before it uses them: both passes walk
// a warp's range batch after batch, one dependent load per batch without this. Measured on two
// H200s at 4096 tokens x 8 (docs/perf-notes.md, v11): the kernel 93 -> 88 us, so those loads
// were a small part of its time (the rest is not located yet). 1 builds the loop as it was,
// for A/B runs (SWIFTEP_NVCC_FLAGS="-DSWIFTEP_DISPATCH_PAIR_LOADS=1").
#ifndef SWIFTEP_DISPATCH_PAIR_LOADS
#define SWIFTEP_DISPATCH_PAIR_LOADS 8
#endif
constexpr int kPairLoads = SWIFTEP_DISPATCH_PAIR_LOADS;

// e[b] <- the index of pair first + b * 32 + lane, or -1 past end. Whole warp.
template <typename IdxT>
__device__ __forceinline__ void load_pair_batch(const void* topk_idx, int64_t first, int64_t end,
                                                int64_t* e) {
#pragma unroll
  for (int b = 0; b < kPairLoads; ++b) {
    const int64_t pair = first + b * kWarpSize + lane_id();
    e[b] = pair < end ? load_index<IdxT>(topk_idx, pair) : -1;
  }
}

__device__ __forceinline__ void warp_pair_range(int64_t num_pairs, int64_t* begin, int64_t* end) {
  const int64_t num_warps = blockDim.x / kWarpSize;
  *begin = num_pairs * warp_id() / num_warps;
  *end = num_pairs * (warp_id() + 1) / num_warps;
}

// Pass 1, whole block. hist: [num_warps][num_experts] shared ints; on return hist[w][e] holds the
// number of pairs of expert e in the ranges of warps before w, and own_counts[e] the total.
// Out-of-range indices count as no expert and are reported when report_to is not null.
template <typename IdxT>
__device__ void count_pairs(const void* topk_idx, int64_t num_pairs, int num_topk,
                            int num_experts, int* hist, int* own_counts,
                            const CommParams* report_to) {
  const int num_warps = blockDim.x / kWarpSize;
  for (int i = threadIdx.x; i < num_warps * num_experts; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  int64_t begin, end;
  warp_pair_range(num_pairs, &begin, &end);
  int* my_hist = hist + warp_id() * num_experts;
  for (int64_t first = begin; first < end; first += kWarpSize * kPairLoads) {
    int64_t e[kPairLoads];
    load_pair_batch<IdxT>(topk_idx, first, end, e);
#pragma unroll
    for (int b = 0; b < kPairLoads; ++b) {
      const int64_t pair = first + b * kWarpSize + lane_id();
      if (pair >= end) continue;
      if (is_expert(e[b], num_experts)) {
        atomicAdd(my_hist + e[b], 1);
      } else if (e[b] != -1 && report_to != nullptr) {
        report_status(*report_to, kStatusBadIndex, pair / num_topk, pair % num_topk, e[b]);
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int running = 0;
    for (int w = 0; w < num_warps; ++w) {
      const int count = hist[w * num_experts + e];
      hist[w * num_experts + e] = running;
      running += count;
    }
    own_counts[e] = running;
  }
  __syncthreads();
}

// Pass 2, whole block, after count_pairs (consumes hist). Calls on_pair(pair, expert, rank) for
// every pair of this block's source: expert -1 for no expert (rank -1), else rank = number of
// this source's pairs of that expert before it in (token, slot) order.
template <typename IdxT, typename OnPair>
__device__ void rank_pairs(const void* topk_idx, int64_t num_pairs, int num_experts, int* hist,
                           OnPair on_pair) {
  int64_t begin, end;
  warp_pair_range(num_pairs, &begin, &end);
  int* my_hist = hist + warp_id() * num_experts;
  const int lane = lane_id();
  for (int64_t first = begin; first < end; first += kWarpSize * kPairLoads) {
    int64_t e[kPairLoads];
    load_pair_batch<IdxT>(topk_idx, first, end, e);
#pragma unroll
    for (int b = 0; b < kPairLoads; ++b) {
      const int64_t batch = first + b * kWarpSize;  // uniform over the warp
      if (batch >= end) break;
      const int64_t pair = batch + lane;
      const bool in_range = pair < end;
      const int expert = in_range && is_expert(e[b], num_experts) ? static_cast<int>(e[b]) : -1;
      const uint32_t peers = __match_any_sync(kFullMask, expert);
      int rank = -1;
      if (expert >= 0) rank = my_hist[expert] + __popc(peers & lanemask_lt());
      __syncwarp();  // every lane has read its base before the leader advances it
      if (expert >= 0 && lane == __ffs(peers) - 1) my_hist[expert] += __popc(peers);
      __syncwarp();
      if (in_range) on_pair(pair, expert, rank);
    }
  }
}

// Shared memory of dispatch_counts_kernel, in ints: hist [num_warps][E], own [E], start [E+1],
// base [E].
__host__ __device__ __forceinline__ int64_t dispatch_counts_smem_ints(int num_warps,
                                                                      int num_experts) {
  return static_cast<int64_t>(num_warps) * num_experts + 3 * static_cast<int64_t>(num_experts) + 1;
}

// ------------------------------------------------------------------------ the counts kernel
// One block. Bumps the throughput epoch, counts this rank's pairs per expert, all-gathers the
// count matrix (which is also the barrier that makes window reuse safe), then computes
// expert_offsets and every own pair's destination row (-1 when none or past capacity).
template <typename IdxT>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * kWarpSize)
    dispatch_counts_kernel(const __grid_constant__ DispatchParams p) {
  __shared__ int scan_scratch[kMaxWarpsPerBlock];
  __shared__ int64_t shared_epoch;
  const CommParams& c = p.comm;
  const int num_experts = c.num_experts;
  const int num_local = c.num_local_experts;
  const int num_warps = blockDim.x / kWarpSize;
  int* hist = reinterpret_cast<int*>(dynamic_smem());
  int* own = hist + static_cast<int64_t>(num_warps) * num_experts;
  int* start = own + num_experts;  // [E + 1]
  int* base = start + num_experts + 1;
  const int64_t num_pairs = static_cast<int64_t>(p.num_tokens) * p.num_topk;

  if (threadIdx.x == 0) {
    reset_status(c);
    const int64_t epoch = ctrl_epoch(c)[kEpochThroughput] + 1;
    ctrl_epoch(c)[kEpochThroughput] = epoch;
    shared_epoch = epoch;
  }
  __syncthreads();
  const int64_t epoch = shared_epoch;

  count_pairs<IdxT>(p.topk_idx, num_pairs, p.num_topk, num_experts, hist, own, &c);

  // counts[parity][rank][*] of every peer (own included) <- own; then release count_flags.
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(c.world_size) * num_experts;
       i += blockDim.x) {
    const int peer = static_cast<int>(i / num_experts);
    const int e = static_cast<int>(i % num_experts);
    counts_at(peer_base(c, peer), c.off_counts, epoch, c.rank, c)[e] = own[e];
  }
  __threadfence_system();
  __syncthreads();
  block_release_to_all_peers(c, c.off_count_flags, epoch);
  const bool all_arrived = block_wait_all_peers(
      c, at_offset<int64_t>(c.workspace, c.off_count_flags), epoch, kWaitCounts);
  if (!all_arrived) {  // TIMEOUT recorded: send nothing, combine reads nothing
    for (int64_t i = threadIdx.x; i < num_pairs; i += blockDim.x) p.token_rows[i] = -1;
    for (int j = threadIdx.x; j <= num_local; j += blockDim.x) p.expert_offsets[j] = 0;
    return;
  }

  // start[e] <- rows of e over all sources, base[e] <- rows of e from sources before this rank.
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int total = 0, before = 0;
    for (int s = 0; s < c.world_size; ++s) {
      const int count = ld_volatile_i32(counts_at(c.workspace, c.off_counts, epoch, s, c) + e);
      total += count;
      if (s < c.rank) before += count;
    }
    start[e] = total;
    base[e] = before;
  }
  __syncthreads();
  const int all_rows = block_exclusive_scan(start, num_experts, scan_scratch);
  if (threadIdx.x == 0) start[num_experts] = all_rows;
  __syncthreads();
  // start[e] is now the first row of e in a window shared by all owners; owner d's window
  // begins at start[d * L]. Every rank checks every owner: all see the same overflow.
  for (int d = threadIdx.x; d < c.world_size; d += blockDim.x) {
    const int needed = start[(d + 1) * num_local] - start[d * num_local];
    if (needed > c.capacity) report_status(c, kStatusCapacity, d, needed, c.capacity);
  }
  for (int j = threadIdx.x; j <= num_local; j += blockDim.x) {
    const int64_t offset = start[c.rank * num_local + j] - start[c.rank * num_local];
    p.expert_offsets[j] = static_cast<int32_t>(offset < c.capacity ? offset : c.capacity);
  }
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    base[e] += start[e] - start[(e / num_local) * num_local];
  }
  __syncthreads();
  rank_pairs<IdxT>(p.topk_idx, num_pairs, num_experts, hist,
                   [&](int64_t pair, int expert, int rank) {
                     int32_t row = -1;
                     if (expert >= 0) {
                       const int64_t r = static_cast<int64_t>(base[expert]) + rank;
                       if (r < c.capacity) row = static_cast<int32_t>(r);
                     }
                     p.token_rows[pair] = row;
                   });
}

}  // namespace swiftep
