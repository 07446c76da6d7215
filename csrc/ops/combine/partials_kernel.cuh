// combine_partials (CommConfig(combine_partials=True)): the throughput combine in two kernels,
// launched by launcher.cu beside it.
//
// 1. combine_push_kernel, on every owner rank: for each (source rank s, token n) with slots
//    here, reduces those slots' rows in slot order in float32 (weights: the ones dispatch sent
//    with each row), reading them from expert_out where it is (a local tensor: no staging copy,
//    no remote read), rounds to expert_out's dtype and stores that partial into s's partials
//    region at row rank * T + n (over the link: one row per (token, owner rank), DeepEP's bytes,
//    not one per (token, expert)). Which rows: dispatch wrote, with each row, an entry
//    epoch << 32 | row at (s * T + n) * K + slot of this rank's pair_rows (units.cuh). When
//    every block is done, the last one releases combine_flags[rank] = epoch into every peer.
// 2. combine_partials_reduce_kernel, on every token's rank: waits (bounded) for every owner's
//    flag, then y[n] = the float32 sum of the partials of n's owner ranks in ascending rank
//    order, rounded: reference.combine(..., ranks_per_node=1). No owner: zeros.
//
// Both reduce with reduce_rows (kernel_ldg.cuh), the default combine's inner loop.
// Safety across calls: a source's pair_rows entries and recv_weights are rewritten only by its
// next dispatch, which comes after its reduce kernel, which waited for this rank's push; the
// partials region of s is rewritten by an owner's next push only after that owner's next
// dispatch, which waited for s's next dispatch, after s's reduce (stream order on s).
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "ops/combine/kernel.cuh"
#include "ops/combine/kernel_ldg.cuh"
#include "swiftep/params.h"

namespace swiftep {

// Rows reduced together and vectors of each in flight per lane (reduce_rows: their product is
// the loads per lane in flight, shaped by each item's row count; this shape past 8 rows),
// overridable at build time (SWIFTEP_NVCC_FLAGS="-DSWIFTEP_PARTIALS_UNROLL=4 ...";
// scripts/combine_variants.sh). A pair has fewer rows than a token (4.0 at EP2, 1.5 at EP8,
// against the pull's 8) and a token few partials, so at the pull's 8 x 2 in rounds a push lane
// had half the loads in flight or less; 4 x 4 was measured 1.53x faster than 8 x 2 at 8
// SMs/rank on two H200s (docs/perf-notes.md, v9), no spills.
#ifndef SWIFTEP_PARTIALS_SLOTS
#define SWIFTEP_PARTIALS_SLOTS 4
#endif
#ifndef SWIFTEP_PARTIALS_UNROLL
#define SWIFTEP_PARTIALS_UNROLL 4
#endif
constexpr int kPartialsSlots = SWIFTEP_PARTIALS_SLOTS;
constexpr int kPartialsUnroll = SWIFTEP_PARTIALS_UNROLL;

// Row of (owner, token) in a rank's partials region: owner * T + token, at the window pitch.
__device__ __forceinline__ int64_t partial_row_offset(const CommParams& c, int owner, int64_t n) {
  return c.off_partials + (static_cast<int64_t>(owner) * c.max_tokens_per_rank + n) * c.row_bytes;
}

// Whether pair q = s * T + n (q < end) has a row here this call: any of its K entries carries
// the tag. Lane l answers for pair first + l; the caller ballots.
__device__ __forceinline__ bool pair_present(const CommParams& c, const uint64_t* entries,
                                             int64_t q, int64_t end, uint32_t tag) {
  if (q >= end) return false;
  bool present = false;
#pragma unroll 8
  for (int k = 0; k < c.num_topk; ++k) {  // independent loads, in flight together
    present |= static_cast<uint32_t>(__ldcg(entries + q * c.num_topk + k) >> 32) == tag;
  }
  return present;
}

// rows: expert_out, rows at pitch p.out_row_bytes, at least capacity of them (the binding
// checks), 16-byte aligned.
template <typename T>
__global__ void __launch_bounds__(kLdgThreads)
    combine_push_kernel(const __grid_constant__ CombineParams p, const uint8_t* rows) {
  __shared__ float weights[kLdgWarps][kMaxTopk];
  __shared__ const uint8_t* sources[kLdgWarps][kMaxTopk];
  const CommParams& c = p.comm;
  const int warp = warp_id();
  const int lane = lane_id();
  const int64_t epoch = ctrl_epoch(c)[kEpochThroughput];  // the matching dispatch's epoch
  const uint32_t tag = static_cast<uint32_t>(epoch);
  const uint64_t* entries = at_offset<const uint64_t>(c.workspace, c.off_pair_rows);
  const float* row_weights = at_offset<const float>(c.workspace, c.off_recv_weights);
  const int64_t num_pairs = static_cast<int64_t>(c.world_size) * c.max_tokens_per_rank;
  const int64_t num_warps_total = static_cast<int64_t>(gridDim.x) * kLdgWarps;
  // A warp takes blocks of up to 32 pairs: one round of loads finds which have rows here (most
  // of W * T are empty when a call has fewer than T tokens), then it reduces those one by one.
  // Blocks are small enough that every warp gets one (32-pair blocks left a third of 384 warps
  // idle at W * T = 8192 and the others with 32 pairs each, one after another).
  const int64_t block_pairs = min(static_cast<int64_t>(kWarpSize),
                                  max(int64_t{1}, ceil_div(num_pairs, num_warps_total)));
  for (int64_t first = (static_cast<int64_t>(blockIdx.x) * kLdgWarps + warp) * block_pairs;
       first < num_pairs; first += num_warps_total * block_pairs) {
    const int64_t end = min(first + block_pairs, num_pairs);
    for (uint32_t todo = __ballot_sync(kFullMask,
                                       pair_present(c, entries, first + lane, end, tag));
         todo != 0; todo &= todo - 1) {  // warp-uniform
      const int64_t q = first + __ffs(todo) - 1;
      const uint64_t entry = lane < c.num_topk ? __ldcg(entries + q * c.num_topk + lane) : 0;
      const uint32_t row = static_cast<uint32_t>(entry);
      const bool valid = lane < c.num_topk && static_cast<uint32_t>(entry >> 32) == tag &&
                         row < static_cast<uint64_t>(c.capacity);
      if (lane < c.num_topk) {
        sources[warp][lane] = valid ? rows + row * p.out_row_bytes : nullptr;
        weights[warp][lane] = valid ? __ldcg(row_weights + row) : 0.f;
      }
      const uint32_t slots = __ballot_sync(kFullMask, valid);
      __syncwarp();
      const int source_rank = static_cast<int>(q / c.max_tokens_per_rank);
      uint8_t* out = at_offset<uint8_t>(peer_base(c, source_rank),
                                        partial_row_offset(c, c.rank, q % c.max_tokens_per_rank));
      reduce_rows<T, kPartialsSlots, kPartialsUnroll>(
          sources[warp], weights[warp], slots, reinterpret_cast<uint4*>(out),
          p.out_row_bytes / 16);
      __syncwarp();  // sources/weights are rewritten by the next pair
    }
  }
  if (!block_done_is_last(c, kDoneCombinePartials)) return;
  block_release_to_all_peers(c, c.off_combine_flags, epoch);
}

// Lane j < the returned count holds the j-th smallest distinct owner rank among the valid
// slots of token n (lane k: slot k); scratch: one int per lane of this warp. Whole warp.
template <typename IdxT>
__device__ __forceinline__ int token_owner_ranks(const CombineParams& p, const CombineWindow& win,
                                                 int64_t n, bool peers_ready, int* scratch,
                                                 int* owner_out) {
  const int lane = lane_id();
  int owner = 0;
  int32_t row = 0;
  const bool valid = combine_slot<IdxT>(p, win, n, lane, peers_ready, &owner, &row);
  // Invalid lanes get a key no valid lane has, so they match nobody.
  const uint32_t same = __match_any_sync(kFullMask, valid ? owner : -1 - lane);
  const bool first_of_owner = valid && (__ffs(same) - 1) == lane;
  int before = 0;  // distinct owners below mine
  for (int k = 0; k < p.num_topk; ++k) {
    const int other = __shfl_sync(kFullMask, owner, k);
    const bool other_first = __shfl_sync(kFullMask, first_of_owner, k);
    before += other_first && other < owner;
  }
  const int count = __popc(__ballot_sync(kFullMask, first_of_owner));
  if (first_of_owner) scratch[before] = owner;
  __syncwarp();
  *owner_out = lane < count ? scratch[lane] : 0;
  __syncwarp();  // scratch is rewritten by the next token
  return count;
}

template <typename T, typename IdxT>
__global__ void __launch_bounds__(kLdgThreads)
    combine_partials_reduce_kernel(const __grid_constant__ CombineParams p) {
  __shared__ float weights[kLdgWarps][kMaxTopk];
  __shared__ const uint8_t* sources[kLdgWarps][kMaxTopk];
  __shared__ int scratch[kLdgWarps][kWarpSize];
  const CommParams& c = p.comm;
  const int warp = warp_id();
  const int lane = lane_id();
  const int64_t epoch = ctrl_epoch(c)[kEpochThroughput];
  const CombineWindow win{c.off_combine_x, c.off_combine_flags, kEpochThroughput, kWaitCombine,
                          c.capacity};
  const bool peers_ready =  // every owner pushed its partials here; on timeout y = 0
      block_wait_all_peers(c, at_offset<int64_t>(c.workspace, c.off_combine_flags), epoch,
                           kWaitCombine);
  weights[warp][lane] = 1.f;  // partials carry their weights already
  const int64_t num_warps_total = static_cast<int64_t>(gridDim.x) * kLdgWarps;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kLdgWarps + warp; n < p.num_tokens;
       n += num_warps_total) {
    int owner = 0;
    const int count = token_owner_ranks<IdxT>(p, win, n, peers_ready, scratch[warp], &owner);
    if (lane < count) sources[warp][lane] = at_offset<uint8_t>(c.workspace,
                                                               partial_row_offset(c, owner, n));
    __syncwarp();
    const uint32_t ranks = count >= kWarpSize ? kFullMask : (1u << count) - 1;
    reduce_rows<T, kPartialsSlots, kPartialsUnroll>(
        sources[warp], weights[warp], ranks,
        reinterpret_cast<uint4*>(static_cast<uint8_t*>(p.y) + n * p.out_row_bytes),
        p.out_row_bytes / 16);
    __syncwarp();  // sources are rewritten by the next token
  }
}

}  // namespace swiftep
