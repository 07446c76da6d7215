// Low-latency dispatch: one kernel, fixed grid, no host sync (CUDA-graph capturable).
//
// Every block recomputes the (small) per-expert counts and ranks of this rank's pairs. Block 0
// writes the counts into every peer's ll_counts[epoch & 1][rank] and releases
// ll_count_flags[rank]. Each block waits (bounded) for the count flags of the LOWER ranks only
// (the packed row of a pair needs the rows lower ranks send to the same expert), computes the
// rows of its contiguous range of units (tokens, or (token, slot) pairs for calls with fewer
// tokens than warps: SendUnits), and sends them (same pipeline as the throughput
// path). The last block to finish bumps ctrl.epoch[1], releases ll_data_flags[rank] into every
// peer, waits for every peer's data flag and writes recv_counts.
//
// Double buffering: a source writes epoch e+2's counts into the same parity slot as epoch e only
// after its call e+1 finished, which needed every peer's data flag of e+1, released after that
// peer's call e (and its reads of slot e & 1) had ended.
// Window reuse: a source's dispatch e+1 follows its combine e, which waited for every owner's
// ll_combine_flags of e (released after the owner's experts read the window of e).
#pragma once

#include <cstdint>

#include "common.cuh"
#include "dispatch.cuh"
#include "layout.cuh"
#include "swiftep/params.h"

namespace swiftep {

// Pairs (token, slot) one unit of work covers: a whole token's K, or one pair (SendUnits).
__host__ __device__ __forceinline__ int pairs_per_unit(int per_token, int num_topk) {
  return per_token == 1 ? num_topk : 1;
}

// Shared ints before the stages: hist [num_warps][E], own [E], rows [units_per_block * pairs
// per unit].
__host__ __device__ __forceinline__ int64_t ll_dispatch_smem_ints(int num_experts,
                                                                  int64_t units_per_block,
                                                                  int per_token, int num_topk) {
  return static_cast<int64_t>(kDispatchWarps) * num_experts + num_experts +
         units_per_block * pairs_per_unit(per_token, num_topk);
}

template <typename IdxT>
__global__ void __launch_bounds__(kDispatchThreads)
    ll_dispatch_kernel(const __grid_constant__ DispatchParams p, int64_t stage_bytes,
                       bool use_tma, int64_t units_per_block, int per_token) {
  __shared__ __align__(8) uint64_t bars[kDispatchWarps][kDispatchStages];
  const CommParams& c = p.comm;
  const int num_experts = c.num_experts;
  const int num_local = c.num_local_experts;
  const int64_t rows_per_expert = c.ll_rows_per_expert;  // S
  const int64_t num_pairs = static_cast<int64_t>(p.num_tokens) * p.num_topk;
  const int64_t smem_ints =
      ll_dispatch_smem_ints(num_experts, units_per_block, per_token, p.num_topk);
  int* hist = reinterpret_cast<int*>(dynamic_smem());
  int* own = hist + static_cast<int64_t>(kDispatchWarps) * num_experts;
  int32_t* rows = own + num_experts;
  uint8_t* stages_all = dynamic_smem() + round_up(smem_ints * 4, kSmemAlign);

  // Every block reads the epoch before any block counts itself done; only the last block
  // stores the new value, so all blocks agree on it.
  const int64_t epoch = ctrl_epoch(c)[kEpochLowLatency] + 1;
  // Block 0 stamps the phase trace; the last block stamps its own points.
  const Tracer trace =
      blockIdx.x == 0 && threadIdx.x == 0 ? make_tracer(c, epoch) : Tracer{nullptr};
  trace.mark(kTrace_dispatch_start);
  if (blockIdx.x == 0 && threadIdx.x == 0) reset_status(c);
  init_warp_barriers(bars[warp_id()], kDispatchStages);

  count_pairs<IdxT>(p.topk_idx, num_pairs, p.num_topk, num_experts, hist, own,
                    blockIdx.x == 0 ? &c : nullptr);  // block 0 alone reports bad indices
  trace.mark(kTrace_dispatch_counted);

  if (blockIdx.x == 0) {  // publish: ll_counts[parity][rank][*] of every peer <- own
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(c.world_size) * num_experts;
         i += blockDim.x) {
      const int peer = static_cast<int>(i / num_experts);
      const int e = static_cast<int>(i % num_experts);
      counts_at(peer_base(c, peer), c.off_ll_counts, epoch, c.rank, c)[e] = own[e];
    }
    __threadfence_system();
    __syncthreads();
    block_release_to_all_peers(c, c.off_ll_count_flags, epoch);
    trace.mark(kTrace_dispatch_published);
  }

  bool lower_ready = true;
  const int64_t* count_flags = at_offset<int64_t>(c.workspace, c.off_ll_count_flags);
  for (int s = threadIdx.x; s < c.rank; s += blockDim.x) {
    lower_ready = wait_flag_geq(c, count_flags + s, epoch, s, kWaitLlCounts) && lower_ready;
  }
  lower_ready = __syncthreads_and(lower_ready) != 0;
  trace.mark(kTrace_dispatch_lower_ready);

  // This block's units [unit_begin, unit_end) cover pairs [pair_begin, pair_end).
  const int64_t num_units = static_cast<int64_t>(p.num_tokens) * per_token;
  const int64_t unit_begin = min(static_cast<int64_t>(blockIdx.x) * units_per_block, num_units);
  const int64_t unit_end = min(unit_begin + units_per_block, num_units);
  const int pairs_per = pairs_per_unit(per_token, p.num_topk);
  const int64_t pair_begin = unit_begin * pairs_per;
  const int64_t pair_end = unit_end * pairs_per;
  rank_pairs<IdxT>(
      p.topk_idx, num_pairs, num_experts, hist, [&](int64_t pair, int expert, int order) {
        if (pair < pair_begin || pair >= pair_end) return;
        int32_t row = -1;
        if (expert >= 0 && lower_ready) {
          int64_t slot = order;
          for (int s = 0; s < c.rank; ++s)
            slot += ld_volatile_i32(counts_at(c.workspace, c.off_ll_counts, epoch, s, c) + expert);
          if (slot < rows_per_expert) {
            row = static_cast<int32_t>((expert % num_local) * rows_per_expert + slot);
          } else {  // nothing is written past the expert's window
            report_status(c, kStatusCapacity, expert / num_local, slot + 1, rows_per_expert);
          }
        }
        rows[pair - pair_begin] = row;
        p.token_rows[pair] = row;
      });
  __syncthreads();
  trace.mark(kTrace_dispatch_ranked);

  const SendWindow win{c.off_ll_recv_x, c.off_ll_recv_scales, c.off_ll_recv_src,
                       c.off_ll_recv_weights};
  uint8_t* stages = stages_all + warp_id() * kDispatchStages * stage_bytes;
  const SendUnits units{unit_begin + warp_id(), kDispatchWarps, unit_end, per_token};
  send_tokens<IdxT>(p, win, units, rows, pair_begin, stages, bars[warp_id()], stage_bytes,
                    use_tma);
  finish_bulk_stores();
  trace.mark(kTrace_dispatch_sent);
  if (!block_done_is_last(c, kDoneLowLatencyDispatch)) return;

  const Tracer last = threadIdx.x == 0 ? make_tracer(c, epoch) : Tracer{nullptr};
  last.mark(kTrace_dispatch_last_block);
  if (threadIdx.x == 0) ctrl_epoch(c)[kEpochLowLatency] = epoch;
  block_release_to_all_peers(c, c.off_ll_data_flags, epoch);
  last.mark(kTrace_dispatch_released);
  const bool all_arrived = block_wait_all_peers(
      c, at_offset<int64_t>(c.workspace, c.off_ll_data_flags), epoch, kWaitLlData);
  last.mark(kTrace_dispatch_arrived);
  // A source's data flag follows its count publication, so every count of this epoch is here.
  for (int j = threadIdx.x; j < num_local; j += blockDim.x) {
    int64_t total = 0;
    if (all_arrived) {
      const int e = c.rank * num_local + j;
      for (int s = 0; s < c.world_size; ++s)
        total += ld_volatile_i32(counts_at(c.workspace, c.off_ll_counts, epoch, s, c) + e);
      if (total > rows_per_expert) report_status(c, kStatusCapacity, c.rank, total, rows_per_expert);
    }
    p.recv_counts[j] = static_cast<int32_t>(total < rows_per_expert ? total : rows_per_expert);
  }
  last.mark(kTrace_dispatch_end);
}

}  // namespace swiftep
