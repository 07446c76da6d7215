// Low-latency dispatch: one kernel, fixed grid, no host sync (CUDA-graph capturable). Its
// launcher is launcher.cu beside it; its combine is the combine kernel (ops/combine/).
//
// Every block recomputes the (small) per-expert counts of this rank's pairs. Block 0 stores
// them, each tagged with the call's epoch (tag_count: the value is its own flag, so no fence
// and no separate flag), into every peer's ll_counts[epoch & 1][rank], and its grid size
// beside them. A block then computes the rows of its contiguous range of units (tokens, pairs,
// pair chunks or token chunks: SendUnits): the packed row of a pair needs the counts LOWER
// ranks send to the same expert (read once per block for every expert, with a bounded wait for
// their tag), plus the pair's order among this rank's pairs of it. It sends them
// (the staged pipeline of the throughput path, ops/send/staged.cuh; a call that quantizes to
// FP8 does it in registers, ops/send/fp8_direct.cuh) and, once its stores are complete, adds 1 to
// ll_arrivals[rank] on every peer (a release at system scope). Block 0 finally sums recv_counts
// from the sources' counts, waits (bounded) until every source's arrivals reach the grid size
// that source published, and writes recv_counts.
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

#include "device/common.cuh"
#include "ops/send/fp8_direct.cuh"
#include "ops/send/staged.cuh"
#include "ops/send/units.cuh"
#include "swiftep/params.h"

namespace swiftep {

// How one low-latency dispatch splits its work (chosen by the launcher, launcher.cu).
struct LlDispatchShape {
  int64_t stage_bytes;      // a pipeline stage (staged path), or the chunk of a unit (parts > 1)
  int64_t units_per_block;  // each block's contiguous range of units
  int64_t rows_cap;         // rows[] entries in shared memory
  int per_token;            // units per token (SendUnits)
  int parts;                // chunks of the row per unit (SendUnits), or 1
  bool one_slot;            // a unit covers one slot of a token (SendUnits), else all K
  bool use_tma;             // staged path: bulk copies (else plain warp copies)
};

// Shared memory before the stages, in ints: peers [world_size] (8-byte pointers first, for
// alignment), own [E], base [E], experts [rows_cap], rows [rows_cap].
__host__ __device__ __forceinline__ int64_t ll_dispatch_smem_ints(int world_size, int num_experts,
                                                                  int64_t rows_cap) {
  return 2 * static_cast<int64_t>(world_size) + 2 * static_cast<int64_t>(num_experts) +
         2 * rows_cap;
}

// Index loads a thread keeps in flight while counting.
constexpr int kCountLoads = 4;

// Whole block, ends with a barrier. Counts this rank's pairs per expert: own[e] over all pairs,
// before[e] over the pairs before the block's own [pair_begin, pair_end); keeps the experts of
// its own pairs (experts[i] of pair pair_begin + i, -1 for none). Out-of-range indices count as
// no expert; block 0 reports them.
template <typename IdxT>
__device__ void count_own_pairs(const DispatchParams& p, int64_t pair_begin, int64_t pair_end,
                                int* own, int* before, int* experts) {
  const int num_experts = p.comm.num_experts;
  const int64_t num_pairs = static_cast<int64_t>(p.num_tokens) * p.num_topk;
  int64_t raw[kCountLoads];
  auto load_round = [&](int64_t q0) {
#pragma unroll
    for (int i = 0; i < kCountLoads; ++i) {
      const int64_t q = q0 + static_cast<int64_t>(i) * blockDim.x;
      raw[i] = q < num_pairs ? load_index<IdxT>(p.topk_idx, q) : -1;
    }
  };
  load_round(threadIdx.x);  // in flight while the counters are cleared
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    own[e] = 0;
    before[e] = 0;
  }
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(kCountLoads) * blockDim.x;
  for (int64_t q0 = threadIdx.x; q0 < num_pairs; q0 += stride) {
    if (q0 != threadIdx.x) load_round(q0);
#pragma unroll
    for (int i = 0; i < kCountLoads; ++i) {
      const int64_t q = q0 + static_cast<int64_t>(i) * blockDim.x;
      if (q >= num_pairs) break;
      const bool valid = is_expert(raw[i], num_experts);
      if (valid) {
        atomicAdd(own + raw[i], 1);
        if (q < pair_begin) atomicAdd(before + raw[i], 1);
      } else if (raw[i] != -1 && blockIdx.x == 0) {
        report_status(p.comm, kStatusBadIndex, q / p.num_topk, q % p.num_topk, raw[i]);
      }
      if (q >= pair_begin && q < pair_end)
        experts[q - pair_begin] = valid ? static_cast<int>(raw[i]) : -1;
    }
  }
  __syncthreads();
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

// Whole block (a barrier inside; the caller ends it with one). The row of each of the block's
// own pairs (experts[0, num_own): their experts) into rows[] and token_rows. A pair's slot in its
// expert's rows: the rows lower ranks send there (their tagged counts, one batched wait per
// thread for the whole block), plus this rank's pairs of that expert before it: those before
// the block's own pairs (base[], counted) and the block's own earlier ones (a scan of
// experts[], read by every lane at once). -1: a wait timed out, send nothing.
__device__ __forceinline__ void rank_own_pairs(const DispatchParams& p, int64_t epoch,
                                               int64_t pair_begin, int64_t num_own,
                                               const int* experts, int* base, int32_t* rows) {
  const CommParams& c = p.comm;
  const int num_experts = c.num_experts;
  const int num_local = c.num_local_experts;
  const int64_t rows_per_expert = c.ll_rows_per_expert;  // S
  if (num_own > 0) {  // uniform over the block
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      const int64_t lower = lower_ranks_rows(c, epoch, e);
      base[e] = lower < 0 ? -1 : static_cast<int>(lower) + base[e];
    }
  }
  __syncthreads();
  // kOrderLanes lanes per own pair, each scanning every kOrderLanes-th earlier pair.
  constexpr int kOrderLanes = 4;
  const int sub = lane_id() % kOrderLanes;
  for (int64_t i0 = 0; i0 < num_own; i0 += blockDim.x / kOrderLanes) {  // uniform
    const int64_t i = i0 + threadIdx.x / kOrderLanes;
    const int expert = i < num_own ? experts[i] : -1;
    int earlier = 0;
    if (expert >= 0) {
      for (int64_t j = sub; j < i; j += kOrderLanes) earlier += experts[j] == expert;
    }
#pragma unroll
    for (int d = 1; d < kOrderLanes; d *= 2) earlier += __shfl_xor_sync(kFullMask, earlier, d);
    if (i >= num_own || sub != 0) continue;
    int32_t row = -1;
    if (expert >= 0 && base[expert] >= 0) {
      const int64_t slot = static_cast<int64_t>(base[expert]) + earlier;
      if (slot >= rows_per_expert) {  // nothing is written past the expert's window
        report_status(c, kStatusCapacity, expert / num_local, slot + 1, rows_per_expert);
      } else {
        row = static_cast<int32_t>((expert % num_local) * rows_per_expert + slot);
      }
    }
    rows[i] = row;
    p.token_rows[pair_begin + i] = row;
  }
}

// Block 0, whole block, after its arrival. First what needs no arrival, while the last blocks'
// data is still on its way: recv_counts' sums into totals[L] (shared), one thread per (local
// expert, source) loading its count (every source's block 0 stored its counts before any of
// its blocks arrived). Then waits until every block of every source has arrived (this grid's
// own included), writes recv_counts and stores the call's epoch.
__device__ __forceinline__ void finish_on_block0(const DispatchParams& p, int64_t epoch,
                                                 int* totals, const Tracer& trace) {
  const CommParams& c = p.comm;
  const int num_experts = c.num_experts;
  const int num_local = c.num_local_experts;
  const int64_t rows_per_expert = c.ll_rows_per_expert;  // S
  for (int j = threadIdx.x; j < num_local; j += blockDim.x) totals[j] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < num_local * c.world_size; i += blockDim.x) {
    const int s = i % c.world_size;
    const int e = c.rank * num_local + i / c.world_size;
    const int64_t count =
        wait_tagged(c, ll_counts_at(c.workspace, epoch, s, c) + e, epoch, s, kWaitLlCounts);
    atomicAdd(totals + i / c.world_size, count < 0 ? 0 : static_cast<int>(count));
  }
  bool ok = true;
  for (int s = threadIdx.x; s < c.world_size; s += blockDim.x) {
    int64_t* expected = at_offset<int64_t>(c.workspace, c.off_ll_expected) + s;
    const int64_t awaited_before = *expected;
    const int64_t blocks = wait_tagged(c, ll_counts_at(c.workspace, epoch, s, c) + num_experts,
                                       epoch, s, kWaitLlCounts);
    if (blocks < 0) {
      ok = false;
      continue;
    }
    const int64_t wanted = awaited_before + blocks;
    *expected = wanted;  // also on timeout: late arrivals of this call stay accounted for
    ok = wait_value_geq(c, at_offset<int64_t>(c.workspace, c.off_ll_arrivals) + s, wanted,
                        epoch, s, kWaitLlData) &&
         ok;
  }
  const bool all_arrived = __syncthreads_and(ok) != 0;
  trace.mark(kTrace_dispatch_arrived);
  for (int j = threadIdx.x; j < num_local; j += blockDim.x) {
    const int64_t total = all_arrived ? totals[j] : 0;
    if (total > rows_per_expert) report_status(c, kStatusCapacity, c.rank, total, rows_per_expert);
    p.recv_counts[j] = static_cast<int32_t>(min(total, rows_per_expert));
  }
  if (threadIdx.x == 0) ctrl_epoch(c)[kEpochLowLatency] = epoch;
  trace.mark(kTrace_dispatch_end);
}

// kDirectFp8: the call quantizes, in registers (send_tokens_fp8_direct: no stages); else the
// staged send_tokens. Two instantiations, so the staged one keeps its smaller register budget.
template <typename IdxT, bool kDirectFp8>
__global__ void __launch_bounds__(kDispatchThreads)
    ll_dispatch_kernel(const __grid_constant__ DispatchParams p,
                       const __grid_constant__ LlDispatchShape shape) {
  __shared__ __align__(8) uint64_t bars[kDispatchWarps][kDispatchStages];
  const CommParams& c = p.comm;
  // Thread 0 of block 0 stamps the trace; the flag's load is only waited for once counted.
  const bool tracer_thread = blockIdx.x == 0 && threadIdx.x == 0;
  const uint64_t start_ns = globaltimer_ns();
  const int64_t trace_on = tracer_thread ? load_trace_on(c) : 0;
  // Every block reads the epoch at its start; block 0 stores the new value only after every
  // block of this grid has signalled its arrival (so has read it): all blocks agree on it.
  const int64_t epoch = ctrl_epoch(c)[kEpochLowLatency] + 1;
  const int num_experts = c.num_experts;
  const int64_t smem_ints = ll_dispatch_smem_ints(c.world_size, num_experts, shape.rows_cap);
  // Peer workspace bases, loaded once: the publication and arrival loops below would otherwise
  // chain a peer-table load before each of their stores.
  uint8_t** peers = reinterpret_cast<uint8_t**>(dynamic_smem());
  int* own = reinterpret_cast<int*>(peers + c.world_size);
  int* base = own + num_experts;
  int* experts = base + num_experts;
  int32_t* rows = experts + shape.rows_cap;
  uint8_t* stages_all = dynamic_smem() + round_up(smem_ints * 4, kSmemAlign);
  for (int peer = threadIdx.x; peer < c.world_size; peer += blockDim.x)
    peers[peer] = peer_base(c, peer);  // visible after count_own_pairs' first barrier
  if (tracer_thread) reset_status(c);
  if constexpr (!kDirectFp8) init_warp_barriers(bars[warp_id()], kDispatchStages);

  // This block's units [unit_begin, unit_end) cover pairs [pair_begin, pair_end).
  const int64_t num_units = static_cast<int64_t>(p.num_tokens) * shape.per_token;
  const int64_t unit_begin =
      min(static_cast<int64_t>(blockIdx.x) * shape.units_per_block, num_units);
  const int64_t unit_end = min(unit_begin + shape.units_per_block, num_units);
  int64_t pair_begin, pair_end;
  unit_pair_range(unit_begin, unit_end, shape.parts, shape.one_slot, p.num_topk, &pair_begin,
                  &pair_end);
  const SendUnits units{unit_begin + warp_id(), kDispatchWarps, unit_end, shape.per_token,
                        shape.parts, shape.one_slot};
  count_own_pairs<IdxT>(p, pair_begin, pair_end, own, base, experts);
  const Tracer trace = tracer_thread ? make_tracer(c, epoch, trace_on) : Tracer{nullptr};
  trace.mark_at(kTrace_dispatch_start, start_ns);
  trace.mark(kTrace_dispatch_counted);

  if (blockIdx.x == 0) {  // ll_counts[parity][rank][0, E] of every peer <- own, grid size
    for (int e = threadIdx.x; e <= num_experts; e += blockDim.x) {
      const int64_t value =
          tag_count(epoch, e < num_experts ? own[e] : static_cast<int>(gridDim.x));
      for (int peer = 0; peer < c.world_size; ++peer)
        st_volatile_i64(ll_counts_at(peers[peer], epoch, c.rank, c) + e, value);
    }
    trace.mark(kTrace_dispatch_published);
  }

  rank_own_pairs(p, epoch, pair_begin, pair_end - pair_begin, experts, base, rows);
  __syncthreads();
  trace.mark(kTrace_dispatch_ranked);

  const SendWindow win{c.off_ll_recv_x, c.off_ll_recv_scales, c.off_ll_recv_src,
                       c.off_ll_recv_weights};
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
  if constexpr (!kDirectFp8) finish_bulk_stores();

  // Arrival: the barrier orders every warp's completed bulk stores and plain stores before the
  // releases (cumulative at system scope) that add this block to every peer's arrivals.
  __syncthreads();
  trace.mark(kTrace_dispatch_sent);
  for (int peer = threadIdx.x; peer < c.world_size; peer += blockDim.x)
    red_release_sys_add_i64(at_offset<int64_t>(peers[peer], c.off_ll_arrivals) + c.rank, 1);
  trace.mark(kTrace_dispatch_signalled);
  if (blockIdx.x != 0) return;

  // Block 0: own is published long ago and no longer read; it holds recv_counts' sums now.
  finish_on_block0(p, epoch, own, trace);
}

}  // namespace swiftep
