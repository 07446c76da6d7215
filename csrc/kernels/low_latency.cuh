// Low-latency dispatch: one kernel, fixed grid, no host sync (CUDA-graph capturable).
//
// Every block recomputes the (small) per-expert counts and ranks of this rank's pairs. Block 0
// stores the counts, each tagged with the call's epoch (tag_count: the value is its own flag, so
// no fence and no separate flag), into every peer's ll_counts[epoch & 1][rank], and its grid
// size beside them. A block then computes the rows of its contiguous range of units (tokens,
// pairs, pair chunks or token chunks: SendUnits): the packed row of a pair needs the counts
// LOWER ranks send to the same expert, read with a bounded wait for their tag. It sends them
// (the staged pipeline of the throughput path; a call that quantizes to FP8 does it in
// registers, quantize_send.cuh) and, once its stores are complete, adds 1 to
// ll_arrivals[rank] on every peer (a release at system scope). Block 0 finally waits (bounded)
// until every source's arrivals reach the grid size that source published, and writes
// recv_counts.
//
// ll_arrivals only grows; ll_expected (own) remembers how many arrivals earlier calls awaited,
// so no counter is ever reset. A source's blocks of call e + 1 start after its call e ended, so
// the arrivals a receiver sees are a prefix: all of e's before any of e + 1's.
// Double buffering: a source writes epoch e+2's counts into the same parity slot as epoch e only
// after its call e+1 finished, which needed every peer's arrivals of e+1, sent after that peer's
// call e (and its reads of slot e & 1) had ended.
// Window reuse: a source's dispatch e+1 follows its combine e, which waited for every owner's
// ll_combine_flags of e (released after the owner's experts read the window of e).
#pragma once

#include <cstdint>

#include "common.cuh"
#include "dispatch.cuh"
#include "layout.cuh"
#include "quantize_send.cuh"
#include "swiftep/params.h"

namespace swiftep {

// How one low-latency dispatch splits its work (chosen by the launcher, low_latency.cu).
struct LlDispatchShape {
  int64_t stage_bytes;      // a pipeline stage (staged path), or the chunk of a unit (parts > 1)
  int64_t units_per_block;  // each block's contiguous range of units
  int64_t rows_cap;         // rows[] entries in shared memory
  int per_token;            // units per token (SendUnits)
  int parts;                // chunks of the row per unit (SendUnits), or 1
  bool one_slot;            // a unit covers one slot of a token (SendUnits), else all K
  bool use_tma;             // staged path: bulk copies (else plain warp copies)
};

// Shared ints before the stages: hist [num_warps][E], own [E], rows [rows_cap].
__host__ __device__ __forceinline__ int64_t ll_dispatch_smem_ints(int num_experts,
                                                                  int64_t rows_cap) {
  return static_cast<int64_t>(kDispatchWarps + 1) * num_experts + rows_cap;
}

// Rows lower ranks send to `expert` this call (the start of this rank's rows there): their
// tagged counts, all loaded before any is checked (one load latency, not one per rank).
// -1 when a wait timed out.
__device__ __forceinline__ int64_t lower_ranks_rows(const CommParams& c, int64_t epoch,
                                                    int expert) {
  constexpr int kBatch = 8;
  int64_t total = 0;
  for (int s0 = 0; s0 < c.rank; s0 += kBatch) {
    int64_t tagged[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      tagged[i] = s0 + i < c.rank
                      ? ld_volatile_i64(ll_counts_at(c.workspace, epoch, s0 + i, c) + expert)
                      : 0;
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (s0 + i >= c.rank) break;
      const int64_t count =
          has_tag(tagged[i], epoch)
              ? tagged_count(tagged[i])
              : wait_tagged(c, ll_counts_at(c.workspace, epoch, s0 + i, c) + expert, epoch,
                            s0 + i, kWaitLlCounts);
      if (count < 0) return -1;
      total += count;
    }
  }
  return total;
}

// kDirectFp8: the call quantizes, in registers (send_tokens_fp8_direct: no stages); else the
// staged send_tokens. Two instantiations, so the staged one keeps its smaller register budget.
template <typename IdxT, bool kDirectFp8>
__global__ void __launch_bounds__(kDispatchThreads)
    ll_dispatch_kernel(const __grid_constant__ DispatchParams p,
                       const __grid_constant__ LlDispatchShape shape) {
  __shared__ __align__(8) uint64_t bars[kDispatchWarps][kDispatchStages];
  const CommParams& c = p.comm;
  const int num_experts = c.num_experts;
  const int num_local = c.num_local_experts;
  const int64_t rows_per_expert = c.ll_rows_per_expert;  // S
  const int64_t num_pairs = static_cast<int64_t>(p.num_tokens) * p.num_topk;
  const int64_t smem_ints = ll_dispatch_smem_ints(num_experts, shape.rows_cap);
  int* hist = reinterpret_cast<int*>(dynamic_smem());
  int* own = hist + static_cast<int64_t>(kDispatchWarps) * num_experts;
  int32_t* rows = own + num_experts;
  uint8_t* stages_all = dynamic_smem() + round_up(smem_ints * 4, kSmemAlign);

  // Every block reads the epoch at its start; block 0 stores the new value only after every
  // block of this grid has signalled its arrival (so has read it): all blocks agree on it.
  const int64_t epoch = ctrl_epoch(c)[kEpochLowLatency] + 1;
  const Tracer trace =
      blockIdx.x == 0 && threadIdx.x == 0 ? make_tracer(c, epoch) : Tracer{nullptr};
  trace.mark(kTrace_dispatch_start);
  if (blockIdx.x == 0 && threadIdx.x == 0) reset_status(c);
  init_warp_barriers(bars[warp_id()], kDispatchStages);

  count_pairs<IdxT>(p.topk_idx, num_pairs, p.num_topk, num_experts, hist, own,
                    blockIdx.x == 0 ? &c : nullptr);  // block 0 alone reports bad indices
  trace.mark(kTrace_dispatch_counted);

  if (blockIdx.x == 0) {  // ll_counts[parity][rank][0, E] of every peer <- own, grid size
    for (int e = threadIdx.x; e <= num_experts; e += blockDim.x) {
      const int64_t value =
          tag_count(epoch, e < num_experts ? own[e] : static_cast<int>(gridDim.x));
      for (int peer = 0; peer < c.world_size; ++peer)
        st_volatile_i64(ll_counts_at(peer_base(c, peer), epoch, c.rank, c) + e, value);
    }
    trace.mark(kTrace_dispatch_published);
  }

  // This block's units [unit_begin, unit_end) cover pairs [pair_begin, pair_end).
  const int64_t num_units = static_cast<int64_t>(p.num_tokens) * shape.per_token;
  const int64_t unit_begin =
      min(static_cast<int64_t>(blockIdx.x) * shape.units_per_block, num_units);
  const int64_t unit_end = min(unit_begin + shape.units_per_block, num_units);
  int64_t pair_begin, pair_end;
  unit_pair_range(unit_begin, unit_end, shape.parts, shape.one_slot, p.num_topk, &pair_begin,
                  &pair_end);
  rank_pairs<IdxT>(
      p.topk_idx, num_pairs, num_experts, hist, [&](int64_t pair, int expert, int order) {
        if (pair < pair_begin || pair >= pair_end) return;
        int32_t row = -1;
        if (expert >= 0) {
          const int64_t lower = lower_ranks_rows(c, epoch, expert);
          const int64_t slot = lower < 0 ? -1 : lower + order;  // -1: timed out, send nothing
          if (slot >= rows_per_expert) {  // nothing is written past the expert's window
            report_status(c, kStatusCapacity, expert / num_local, slot + 1, rows_per_expert);
          } else if (slot >= 0) {
            row = static_cast<int32_t>((expert % num_local) * rows_per_expert + slot);
          }
        }
        rows[pair - pair_begin] = row;
        p.token_rows[pair] = row;
      });
  __syncthreads();
  trace.mark(kTrace_dispatch_ranked);

  const SendWindow win{c.off_ll_recv_x, c.off_ll_recv_scales, c.off_ll_recv_src,
                       c.off_ll_recv_weights};
  const SendUnits units{unit_begin + warp_id(), kDispatchWarps, unit_end, shape.per_token,
                        shape.parts, shape.one_slot};
  const Tracer warp_trace = warp_id() == 0 ? trace : Tracer{nullptr};
  if constexpr (kDirectFp8) {
    send_tokens_fp8_direct<IdxT>(p, win, units, rows, pair_begin,
                                 shape.stage_bytes / (kFp8Block * dtype_bytes(p.x_dtype)),
                                 warp_trace);
  } else {
    uint8_t* stages = stages_all + warp_id() * kDispatchStages * shape.stage_bytes;
    send_tokens<IdxT>(p, win, units, rows, pair_begin, stages, bars[warp_id()],
                      shape.stage_bytes, shape.use_tma, warp_trace);
  }
  finish_bulk_stores();

  // Arrival: the barrier orders every warp's completed bulk stores and plain stores before the
  // releases (cumulative at system scope) that add this block to every peer's arrivals.
  __syncthreads();
  trace.mark(kTrace_dispatch_sent);
  for (int peer = threadIdx.x; peer < c.world_size; peer += blockDim.x)
    red_release_sys_add_i64(at_offset<int64_t>(peer_base(c, peer), c.off_ll_arrivals) + c.rank,
                            1);
  trace.mark(kTrace_dispatch_signalled);
  if (blockIdx.x != 0) return;

  // Block 0: wait until every block of every source has arrived (this grid's own included).
  bool ok = true;
  for (int s = threadIdx.x; s < c.world_size; s += blockDim.x) {
    const int64_t blocks = wait_tagged(c, ll_counts_at(c.workspace, epoch, s, c) + num_experts,
                                       epoch, s, kWaitLlCounts);
    if (blocks < 0) {
      ok = false;
      continue;
    }
    int64_t* expected = at_offset<int64_t>(c.workspace, c.off_ll_expected) + s;
    const int64_t wanted = *expected + blocks;
    *expected = wanted;  // also on timeout: late arrivals of this call stay accounted for
    ok = wait_value_geq(c, at_offset<int64_t>(c.workspace, c.off_ll_arrivals) + s, wanted,
                        epoch, s, kWaitLlData) &&
         ok;
  }
  // recv_counts: one thread per (local expert, source) loads its count (every source's
  // counts are here: its block 0 stored them before arriving), a shared sum per expert. One
  // load latency instead of world_size dependent ones.
  int* totals = hist;  // count_pairs' histogram is no longer needed
  for (int j = threadIdx.x; j < num_local; j += blockDim.x) totals[j] = 0;
  const bool all_arrived = __syncthreads_and(ok) != 0;
  trace.mark(kTrace_dispatch_arrived);
  if (all_arrived) {
    for (int i = threadIdx.x; i < num_local * c.world_size; i += blockDim.x) {
      const int s = i % c.world_size;
      const int e = c.rank * num_local + i / c.world_size;
      const int64_t count =
          wait_tagged(c, ll_counts_at(c.workspace, epoch, s, c) + e, epoch, s, kWaitLlCounts);
      atomicAdd(totals + i / c.world_size, count < 0 ? 0 : static_cast<int>(count));
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < num_local; j += blockDim.x) {
    const int64_t total = all_arrived ? totals[j] : 0;
    if (total > rows_per_expert) report_status(c, kStatusCapacity, c.rank, total, rows_per_expert);
    p.recv_counts[j] = static_cast<int32_t>(min(total, rows_per_expert));
  }
  if (threadIdx.x == 0) ctrl_epoch(c)[kEpochLowLatency] = epoch;
  trace.mark(kTrace_dispatch_end);
}

}  // namespace swiftep
