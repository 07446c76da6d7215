// Shared by both dispatches: the staged send (a TMA pipeline through shared memory) of the
// throughput data kernel and of the low-latency kernel when it does not quantize.
//
// One warp per token stream. Lane 0 drives a kDispatchStages-deep TMA pipeline: each token (or
// chunk of a long row) is bulk-loaded ONCE into the warp's shared stage and bulk-stored from
// there to every valid destination row (top-k fan-out, possibly several rows on one rank).
// Lanes 0..K-1 write the per-row metadata (source, weight, FP8 scales) with plain stores. A
// quantizing call quantizes each staged chunk in place before its stores (quantize_stage_fp8).
// Completion: lane 0 waits for all its bulk groups (writes done) and fences the async proxy
// (finish_bulk_stores); what a kernel publishes after that is its own (see its kernel file).
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "ops/send/fp8_quantize.cuh"
#include "ops/send/units.cuh"
#include "swiftep/params.h"

namespace swiftep {

// Writes the scales of one quantized chunk (blocks [col0, col0 + blocks) of the row) into the
// rows of every slot's destination; lane b holds block b's scale. Whole warp.
__device__ __forceinline__ void send_scales(const DispatchParams& p, const SendWindow& win,
                                            PairDest mine, int64_t col0, int blocks,
                                            float my_scale) {
  for (int k = 0; k < p.num_topk; ++k) {
    const int32_t row = __shfl_sync(kFullMask, mine.row, k);
    const int32_t peer = __shfl_sync(kFullMask, mine.peer, k);
    if (row < 0) continue;
    float* dst = at_offset<float>(peer_base(p.comm, peer), win.off_scales) +
                 static_cast<int64_t>(row) * p.scale_cols + col0;
    if (lane_id() < blocks) dst[lane_id()] = my_scale;
  }
}

// send_tokens without bulk copies: x or its rows are not 16-byte aligned (never with
// quantize_fp8, which the launchers refuse; the launchers use parts == 1 here). num_mine: the
// warp's units. Plain warp copies straight from x to every destination row (kFanout: to the
// rows sender_writes_row keeps).
template <typename IdxT, bool kFanout>
__device__ __forceinline__ void send_tokens_plain(const DispatchParams& p, const SendWindow& win,
                                                  const SendUnits& units, const int32_t* rows,
                                                  int64_t rows_pair0, int64_t num_mine) {
  const CommParams& c = p.comm;
  const int lane = lane_id();
  const int64_t row_bytes = p.x_row_bytes;
  const uint8_t* x = static_cast<const uint8_t*>(p.x);
  for (int64_t t = 0; t < num_mine; ++t) {
    const int64_t u = units.first + t * units.step;
    const int64_t n = units.token(u);
    const PairDest mine = unit_dest<IdxT>(p, units, u, lane, rows, rows_pair0);
    send_metadata(p, win, n, mine);
    const bool writes = kFanout ? sender_writes_row(c, mine, p.num_topk) : mine.row >= 0;
    for (int k = 0; k < p.num_topk; ++k) {
      const PairDest dest{__shfl_sync(kFullMask, mine.row, k),
                          __shfl_sync(kFullMask, mine.peer, k)};
      if (kFanout ? __shfl_sync(kFullMask, writes, k) : dest.row >= 0)
        warp_copy_bytes(row_address(c, win, dest, p.out_row_bytes), x + n * row_bytes,
                        row_bytes, lane);
    }
  }
}

// Sends this warp's units. stages: this warp's kDispatchStages * stage_bytes of shared memory;
// bars: its kDispatchStages mbarriers (initialised). use_tma false: send_tokens_plain.
// stage_bytes: a chunk of x's row; with quantize_fp8 a whole number of 128-channel blocks, at
// most 32 of them.
// units.parts > 1: stage_bytes makes the row exactly `parts` chunks. trace: warp 0 of block 0
// stamps its first item (others pass Tracer{nullptr}). kFanout (the throughput dispatch with
// dispatch_fanout): bulk-stores only the rows sender_writes_row keeps; metadata and FP8 scales
// still go to every row.
template <typename IdxT, bool kFanout = false>
__device__ void send_tokens(const DispatchParams& p, const SendWindow& win, const SendUnits& units,
                            const int32_t* rows, int64_t rows_pair0, uint8_t* stages,
                            uint64_t* bars, int64_t stage_bytes, bool use_tma,
                            const Tracer& trace) {
  const CommParams& c = p.comm;
  const int lane = lane_id();
  const int64_t row_bytes = p.x_row_bytes;  // source row
  const int64_t pitch = p.out_row_bytes;    // destination row (smaller when quantizing)
  const uint8_t* x = static_cast<const uint8_t*>(p.x);
  if (units.first >= units.end) return;
  const int64_t num_mine = ceil_div(units.end - units.first, units.step);
  if (!use_tma) {
    send_tokens_plain<IdxT, kFanout>(p, win, units, rows, rows_pair0, num_mine);
    return;
  }

  const int elem_bytes = p.quantize_fp8 ? dtype_bytes(p.x_dtype) : 1;
  // Item i: unit i / per_unit, chunk i % per_unit (a whole row), or the unit's own chunk.
  const int64_t per_unit = units.parts > 1 ? 1 : ceil_div(row_bytes, stage_bytes);
  const int64_t num_items = num_mine * per_unit;
  auto item_unit = [&](int64_t item) { return units.first + (item / per_unit) * units.step; };
  auto item_chunk = [&](int64_t item, int64_t u) -> int64_t {
    return units.parts > 1 ? units.part(u) : item % per_unit;
  };
  auto issue_load = [&](int64_t item) {  // lane 0 only
    const int stage = static_cast<int>(item % kDispatchStages);
    const int64_t u = item_unit(item);
    const int64_t n = units.token(u);
    const int64_t offset = item_chunk(item, u) * stage_bytes;
    const uint32_t bytes = static_cast<uint32_t>(min(stage_bytes, row_bytes - offset));
    mbarrier_arrive_expect_tx(bars + stage, bytes);
    tma_load_1d(stages + stage * stage_bytes, x + n * row_bytes + offset, bytes, bars + stage);
  };
  if (lane == 0) {
    for (int64_t item = 0; item < num_items && item < kDispatchStages; ++item) issue_load(item);
  }
  PairDest mine{-1, -1};          // lane k: slot k's destination in the current unit
  uint8_t* my_target = nullptr;
  for (int64_t item = 0; item < num_items; ++item) {
    const int stage = static_cast<int>(item % kDispatchStages);
    const uint32_t parity = static_cast<uint32_t>((item / kDispatchStages) & 1);
    const int64_t u = item_unit(item);
    const int64_t n = units.token(u);
    const int64_t offset = item_chunk(item, u) * stage_bytes;
    uint32_t bytes = static_cast<uint32_t>(min(stage_bytes, row_bytes - offset));
    int64_t out_offset = offset;
    if (item % per_unit == 0) {  // a unit's destinations are read once, not once per chunk
      mine = unit_dest<IdxT>(p, units, u, lane, rows, rows_pair0);
      if (units.parts == 1 || units.part(u) == 0) send_metadata(p, win, n, mine);
      my_target = row_address(c, win, mine, pitch);
      if (kFanout && !sender_writes_row(c, mine, p.num_topk)) my_target = nullptr;
    }
    uint8_t* stage_ptr = stages + stage * stage_bytes;
    if (p.quantize_fp8) {
      mbarrier_wait_parity(bars + stage, parity);  // every lane reads the staged chunk
      if (item == 0) trace.mark(kTrace_dispatch_first_loaded);
      const int blocks = static_cast<int>(bytes / (kFp8Block * elem_bytes));
      const float my_scale = quantize_stage_fp8(stage_ptr, blocks, p.x_dtype, elem_bytes);
      if (item == 0) trace.mark(kTrace_dispatch_first_quantized);
      send_scales(p, win, mine, offset / (kFp8Block * elem_bytes), blocks, my_scale);
      bytes /= elem_bytes;
      out_offset /= elem_bytes;
    } else if (lane == 0) {
      mbarrier_wait_parity(bars + stage, parity);
      if (item == 0) trace.mark(kTrace_dispatch_first_loaded);
    }
    for (int k = 0; k < p.num_topk; ++k) {
      uint8_t* target = reinterpret_cast<uint8_t*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(my_target), k));
      if (lane == 0 && target != nullptr) tma_store_1d(target + out_offset, stage_ptr, bytes);
    }
    if (lane == 0) {
      bulk_commit_group();
      if (item + kDispatchStages < num_items) {
        bulk_wait_group_read<0>();  // this stage's stores have read it: refill it
        issue_load(item + kDispatchStages);
      }
    }
    __syncwarp();  // quantize_fp8: no lane rewrites a stage before lane 0 saw its stores read it
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

}  // namespace swiftep
