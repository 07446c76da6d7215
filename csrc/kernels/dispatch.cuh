// Dispatch data movement, shared by the throughput data kernel and the low-latency kernel.
//
// One warp per token stream. Lane 0 drives a kDispatchStages-deep TMA pipeline: each token (or
// chunk of a long row) is bulk-loaded ONCE into the warp's shared stage and bulk-stored from
// there to every valid destination row (top-k fan-out, possibly several rows on one rank).
// Lanes 0..K-1 write the per-row metadata (source, weight, FP8 scales) with plain stores.
//
// Completion: lane 0 waits for all its bulk groups (writes done), fences the async proxy, and
// every thread fences at system scope before its block counts itself done; the last block
// releases the data flag into every peer, then waits (bounded) for every peer's data flag.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "swiftep/params.h"

namespace swiftep {

// Warps of a dispatch block: each keeps its own pipeline of bulk copies in flight.
constexpr int kDispatchWarps = 8;
constexpr int kDispatchThreads = kDispatchWarps * kWarpSize;
// Two stages: the load of the next token overlaps the fan-out stores of the current one.
constexpr int kDispatchStages = 2;
// Cap of one stage: kDispatchWarps * kDispatchStages stages must fit next to the other smem.
constexpr int64_t kMaxDispatchStageBytes = 12 * 1024;

// Where a path's rows land (byte offsets of a workspace's regions).
struct SendWindow {
  int64_t off_x;
  int64_t off_scales;
  int64_t off_src;
  int64_t off_weights;
};

// Destination of pair (n, k): row on its owner and the owner, or row -1.
struct PairDest {
  int32_t row;
  int32_t peer;
};

// rows: the row of (n, k) at rows[(n - rows_token0) * K + k], in global or shared memory.
template <typename IdxT>
__device__ __forceinline__ PairDest pair_dest(const DispatchParams& p, int64_t n, int k,
                                              const int32_t* rows, int64_t rows_token0) {
  PairDest dest{-1, -1};
  if (k >= p.num_topk) return dest;
  const int32_t row = rows[(n - rows_token0) * p.num_topk + k];
  const int64_t e = load_index<IdxT>(p.topk_idx, n * p.num_topk + k);
  if (row < 0 || !is_expert(e, p.comm.num_experts)) return dest;
  dest.row = row;
  dest.peer = static_cast<int32_t>(e / p.comm.num_local_experts);
  return dest;
}

// Metadata of token n's rows; lane k holds the destination of slot k. Whole warp, uniform.
__device__ __forceinline__ void send_metadata(const DispatchParams& p, const SendWindow& win,
                                              int64_t n, PairDest mine) {
  const CommParams& c = p.comm;
  const int lane = lane_id();
  if (mine.row >= 0) {
    uint8_t* base = peer_base(c, mine.peer);
    at_offset<int2>(base, win.off_src)[mine.row] = make_int2(c.rank, static_cast<int>(n));
    at_offset<float>(base, win.off_weights)[mine.row] = p.topk_weights[n * p.num_topk + lane];
  }
  if (p.scale_cols == 0) return;
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

__device__ __forceinline__ uint8_t* row_address(const CommParams& c, const SendWindow& win,
                                                PairDest dest, int64_t pitch) {
  if (dest.row < 0) return nullptr;
  return at_offset<uint8_t>(peer_base(c, dest.peer), win.off_x) + dest.row * pitch;
}

// Sends tokens first, first + step, ... < end with this warp. stages: this warp's
// kDispatchStages * stage_bytes of shared memory; bars: its kDispatchStages mbarriers
// (initialised). use_tma false: plain warp copies (x or its rows are not 16-byte aligned).
template <typename IdxT>
__device__ void send_tokens(const DispatchParams& p, const SendWindow& win, int64_t first,
                            int64_t step, int64_t end, const int32_t* rows, int64_t rows_token0,
                            uint8_t* stages, uint64_t* bars, int64_t stage_bytes, bool use_tma) {
  const CommParams& c = p.comm;
  const int lane = lane_id();
  const int64_t row_bytes = p.x_row_bytes;
  const uint8_t* x = static_cast<const uint8_t*>(p.x);
  if (first >= end) return;
  const int64_t num_mine = ceil_div(end - first, step);

  if (!use_tma) {
    for (int64_t t = 0; t < num_mine; ++t) {
      const int64_t n = first + t * step;
      const PairDest mine = pair_dest<IdxT>(p, n, lane, rows, rows_token0);
      send_metadata(p, win, n, mine);
      for (int k = 0; k < p.num_topk; ++k) {
        const PairDest dest{__shfl_sync(kFullMask, mine.row, k),
                            __shfl_sync(kFullMask, mine.peer, k)};
        if (dest.row >= 0)
          warp_copy_bytes(row_address(c, win, dest, row_bytes), x + n * row_bytes, row_bytes, lane);
      }
    }
    return;
  }

  const int64_t chunks = ceil_div(row_bytes, stage_bytes);
  const int64_t num_items = num_mine * chunks;  // item i: token i / chunks, chunk i % chunks
  auto issue_load = [&](int64_t item) {         // lane 0 only
    const int stage = static_cast<int>(item % kDispatchStages);
    const int64_t n = first + (item / chunks) * step;
    const int64_t offset = (item % chunks) * stage_bytes;
    const uint32_t bytes = static_cast<uint32_t>(min(stage_bytes, row_bytes - offset));
    mbarrier_arrive_expect_tx(bars + stage, bytes);
    tma_load_1d(stages + stage * stage_bytes, x + n * row_bytes + offset, bytes, bars + stage);
  };
  if (lane == 0) {
    for (int64_t item = 0; item < num_items && item < kDispatchStages; ++item) issue_load(item);
  }
  uint8_t* my_target = nullptr;  // lane k: slot k's destination row of the current token
  for (int64_t item = 0; item < num_items; ++item) {
    const int stage = static_cast<int>(item % kDispatchStages);
    const uint32_t parity = static_cast<uint32_t>((item / kDispatchStages) & 1);
    const int64_t n = first + (item / chunks) * step;
    const int64_t chunk = item % chunks;
    const int64_t offset = chunk * stage_bytes;
    const uint32_t bytes = static_cast<uint32_t>(min(stage_bytes, row_bytes - offset));
    if (chunk == 0) {  // a token's destinations are read once, not once per chunk
      const PairDest mine = pair_dest<IdxT>(p, n, lane, rows, rows_token0);
      send_metadata(p, win, n, mine);
      my_target = row_address(c, win, mine, row_bytes);
    }
    if (lane == 0) mbarrier_wait_parity(bars + stage, parity);
    for (int k = 0; k < p.num_topk; ++k) {
      uint8_t* target = reinterpret_cast<uint8_t*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(my_target), k));
      if (lane == 0 && target != nullptr)
        tma_store_1d(target + offset, stages + stage * stage_bytes, bytes);
    }
    if (lane == 0) {
      bulk_commit_group();
      if (item + kDispatchStages < num_items) {
        bulk_wait_group_read<0>();  // this stage's stores have read it: refill it
        issue_load(item + kDispatchStages);
      }
    }
  }
}

// Lane 0's bulk stores are complete and ordered before the generic-proxy fences that follow.
__device__ __forceinline__ void finish_bulk_stores() {
  if (lane_id() == 0) {
    bulk_wait_group<0>();
    fence_proxy_async();
  }
  __syncwarp();
}

// ------------------------------------------------------------- throughput dispatch, phase 2
// num_sms blocks. Reads the epoch and token_rows phase 1 left; sends; the last block releases
// data_flags[rank] = epoch on every peer and waits until every peer's rows have arrived here.
template <typename IdxT>
__global__ void __launch_bounds__(kDispatchThreads)
    dispatch_data_kernel(const __grid_constant__ DispatchParams p, int64_t stage_bytes,
                         bool use_tma) {
  __shared__ __align__(8) uint64_t bars[kDispatchWarps][kDispatchStages];
  const CommParams& c = p.comm;
  const int64_t epoch = ctrl_epoch(c)[kEpochThroughput];  // bumped by phase 1 of this call
  const SendWindow win{c.off_recv_x, c.off_recv_scales, c.off_recv_src, c.off_recv_weights};
  init_warp_barriers(bars[warp_id()], kDispatchStages);
  const int64_t num_warps_total = static_cast<int64_t>(gridDim.x) * kDispatchWarps;
  const int64_t global_warp = static_cast<int64_t>(blockIdx.x) * kDispatchWarps + warp_id();
  uint8_t* stages = dynamic_smem() + warp_id() * kDispatchStages * stage_bytes;
  send_tokens<IdxT>(p, win, global_warp, num_warps_total, p.num_tokens, p.token_rows, 0, stages,
                    bars[warp_id()], stage_bytes, use_tma);
  finish_bulk_stores();
  if (!block_done_is_last(c, kDoneDispatchData)) return;
  block_release_to_all_peers(c, c.off_data_flags, epoch);
  block_wait_all_peers(c, at_offset<int64_t>(c.workspace, c.off_data_flags), epoch, kWaitData);
}

}  // namespace swiftep
