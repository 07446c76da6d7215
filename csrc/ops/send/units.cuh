// Shared by both dispatches (throughput data kernel: ops/dispatch/, low-latency kernel:
// ops/low_latency_dispatch/): the block shape of a dispatch, how a warp's work splits into send
// units (tokens, pairs, chunks), where a unit's rows go, and the per-row metadata stores.
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "swiftep/params.h"

namespace swiftep {

// Warps of a dispatch block: each keeps its own pipeline of bulk copies in flight.
constexpr int kDispatchWarps = 8;
constexpr int kDispatchThreads = kDispatchWarps * kWarpSize;
// Two stages: the load of the next token overlaps the fan-out stores of the current one.
constexpr int kDispatchStages = 2;
// Cap of one stage: kDispatchWarps * kDispatchStages stages must fit next to the other smem.
constexpr int64_t kMaxDispatchStageBytes = 12 * 1024;
// Smallest chunk a small call splits a pair's row into (SendUnits parts): below it, a warp's
// fixed cost per unit (destination, barrier, bulk-copy issue) outweighs the bytes it moves.
constexpr int64_t kMinDispatchChunkBytes = 512;

// Where a path's rows land (byte offsets of a workspace's regions).
struct SendWindow {
  int64_t off_x;
  int64_t off_scales;
  int64_t off_src;
  int64_t off_weights;
  // combine_partials (throughput only): region pair_rows, where each row's (source, token,
  // slot) entry goes, tagged pair_tag | row; -1: none.
  int64_t off_pair_rows = -1;
  uint64_t pair_tag = 0;  // epoch << 32
};

// The work units of one warp: units first, first + step, ... < end. A unit covers one slot or
// all K slots of a token (one_slot), and the whole row or one of its `parts` chunks (parts > 1:
// the row is exactly `parts` chunks, the unit's chunk is unit % parts):
// - whole token: per_token == 1, parts == 1, !one_slot (calls with at least as many tokens as
//   warps);
// - pair, or pair chunk: per_token == num_topk * parts, one_slot. Fewer tokens than warps
//   (decode): a token's K fan-out stores, and the pieces of each, run on warps side by side
//   instead of one after another on one warp;
// - token chunk: per_token == parts, !one_slot. The same for a dispatch that quantizes: each
//   chunk is quantized once (not once per slot) and stored to every slot's row.
struct SendUnits {
  int64_t first;
  int64_t step;
  int64_t end;
  int per_token;
  int parts;
  bool one_slot;

  __host__ __device__ __forceinline__ int64_t token(int64_t u) const { return u / per_token; }
  // The slot of a one_slot unit.
  __host__ __device__ __forceinline__ int slot(int64_t u) const {
    return static_cast<int>(u % per_token) / parts;
  }
  __host__ __device__ __forceinline__ int part(int64_t u) const {
    return static_cast<int>(u % parts);
  }
};

// The pairs [*pair_begin, *pair_end) units [unit_begin, unit_end) cover.
__host__ __device__ __forceinline__ void unit_pair_range(int64_t unit_begin, int64_t unit_end,
                                                         int parts, bool one_slot, int num_topk,
                                                         int64_t* pair_begin,
                                                         int64_t* pair_end) {
  // Units of one pair (one_slot) or one token (else) are `parts` consecutive units.
  const int64_t first = unit_begin / parts;
  const int64_t last = unit_end > unit_begin ? (unit_end - 1) / parts + 1 : first;
  const int64_t pairs_per = one_slot ? 1 : num_topk;
  *pair_begin = first * pairs_per;
  *pair_end = last * pairs_per;
}

// Most pairs a range of `units` consecutive units can cover (sizes per-block pair arrays).
__host__ __device__ __forceinline__ int64_t max_pairs_of_units(int64_t units, int parts,
                                                               bool one_slot, int num_topk) {
  return (units / parts + 2) * (one_slot ? 1 : num_topk);
}

// A call with fewer tokens than the grid has warps: its units are smaller than a token.
__host__ __device__ __forceinline__ bool is_small_call(int64_t num_tokens, int64_t total_warps) {
  return num_tokens < total_warps;
}

// Units per token for a call of num_tokens tokens on a grid of total_warps warps.
__host__ __device__ __forceinline__ int units_per_token(int64_t num_tokens, int num_topk,
                                                        int64_t total_warps) {
  return is_small_call(num_tokens, total_warps) ? num_topk : 1;
}

// Destination of pair (n, k): row on its owner and the owner, or row -1.
struct PairDest {
  int32_t row;
  int32_t peer;
};

// Lane k's destination in unit u: pair (n, k), or none when the unit is another slot's pair.
// rows: the row of pair i at rows[i - rows_pair0], in global or shared memory.
template <typename IdxT>
__device__ __forceinline__ PairDest unit_dest(const DispatchParams& p, const SendUnits& units,
                                              int64_t u, int k, const int32_t* rows,
                                              int64_t rows_pair0) {
  PairDest dest{-1, -1};
  const int64_t n = units.token(u);
  if (k >= p.num_topk) return dest;
  if (units.one_slot && k != units.slot(u)) return dest;
  const int64_t pair = n * p.num_topk + k;
  const int32_t row = rows[pair - rows_pair0];
  const int64_t e = load_index<IdxT>(p.topk_idx, pair);
  if (row < 0 || !is_expert(e, p.comm.num_experts)) return dest;
  dest.row = row;
  dest.peer = static_cast<int32_t>(e / p.comm.num_local_experts);
  return dest;
}

// Metadata of token n's rows; lane k holds the destination of slot k (or none). Whole warp.
// FP8 scales are copied from x_scales here; when dispatch quantizes, send_scales writes them.
__device__ __forceinline__ void send_metadata(const DispatchParams& p, const SendWindow& win,
                                              int64_t n, PairDest mine) {
  const CommParams& c = p.comm;
  const int lane = lane_id();
  if (mine.row >= 0) {
    uint8_t* base = peer_base(c, mine.peer);
    at_offset<int2>(base, win.off_src)[mine.row] = make_int2(c.rank, static_cast<int>(n));
    at_offset<float>(base, win.off_weights)[mine.row] = p.topk_weights[n * p.num_topk + lane];
    if (win.off_pair_rows >= 0) {  // the owner's combine finds the token's rows here
      const int64_t entry = (static_cast<int64_t>(c.rank) * c.max_tokens_per_rank + n) *
                                c.num_topk + lane;
      at_offset<uint64_t>(base, win.off_pair_rows)[entry] =
          win.pair_tag | static_cast<uint32_t>(mine.row);
    }
  }
  if (p.scale_cols == 0 || p.quantize_fp8) return;
  for (int k = 0; k < p.num_topk; ++k) {
    const int32_t row = __shfl_sync(kFullMask, mine.row, k);
    const int32_t peer = __shfl_sync(kFullMask, mine.peer, k);
    if (row < 0) continue;
    float* dst = at_offset<float>(peer_base(c, peer), win.off_scales) +
                 static_cast<int64_t>(row) * p.scale_cols;
    const float* src = p.x_scales + n * p.scale_cols;
    for (int col = lane; col < p.scale_cols; col += kWarpSize) dst[col] = src[col];
  }
}

// dispatch_fanout: whether lane k's row is one the sender writes: every row on this rank, and on
// another rank only the lowest of the token's rows there (that rank copies it into the others:
// ops/dispatch/fanout_kernel.cuh picks the same row). Whole warp; with one slot per unit each
// unit knows one row, so it is always written.
__device__ __forceinline__ bool sender_writes_row(const CommParams& c, PairDest mine,
                                                  int num_topk) {
  bool writes = mine.row >= 0;
  for (int j = 0; j < num_topk; ++j) {
    const int32_t row = __shfl_sync(kFullMask, mine.row, j);
    const int32_t peer = __shfl_sync(kFullMask, mine.peer, j);
    if (mine.peer != c.rank && peer == mine.peer && row >= 0 && row < mine.row) writes = false;
  }
  return writes;
}

__device__ __forceinline__ uint8_t* row_address(const CommParams& c, const SendWindow& win,
                                                PairDest dest, int64_t pitch) {
  if (dest.row < 0) return nullptr;
  return at_offset<uint8_t>(peer_base(c, dest.peer), win.off_x) + dest.row * pitch;
}

}  // namespace swiftep
