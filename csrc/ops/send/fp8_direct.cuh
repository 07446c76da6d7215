// The low-latency dispatch's quantizing send, without stages: x is loaded straight into
// registers, quantized there (ops/send/fp8_quantize.cuh) and stored to every slot's row with
// plain 16-byte stores. Kept beside the staged send it replaces for that call.
//
// Why not the staged TMA pipeline of send_tokens (ops/send/staged.cuh): a quantizing warp must
// wait for a whole staged chunk, quantize it, and only then issue its bulk stores, so a call's
// first bytes leave late (at 128 tokens the loads of every warp land together, then every warp
// quantizes while memory idles), and smaller chunks only trade that for more bulk-copy
// operations. Here each lane holds 16 elements of a 128-channel block (8 lanes per block, 4
// blocks per pass), the next group of passes is loaded while the current one is quantized, and
// each pass leaves as one coalesced 512-byte warp store per destination row (measured:
// docs/perf-notes.md, v5).
#pragma once

#include <cstdint>

#include "device/common.cuh"
#include "ops/send/fp8_quantize.cuh"
#include "ops/send/units.cuh"
#include "swiftep/params.h"

namespace swiftep {

// Passes (4 blocks each) one group loads at once; the next group's loads are in flight while
// this one is quantized and stored. 4 passes: 4 KB of bf16 per warp per group.
constexpr int kDirectPasses = 4;

// The warp's main loop, one function: its pieces share the register-resident groups (cur, next,
// v, packed), and splitting it was not worth the risk to the kernel's register budget (228).
// Sends this warp's units (token chunks or whole tokens: !units.one_slot) of an FP8-quantizing
// dispatch. chunk_blocks: blocks of one unit when units.parts > 1. rows: the row of pair i at
// rows[i - rows_pair0]. x's rows and the window's rows are 16-byte aligned (the launcher
// checks). trace: warp 0 of block 0 stamps its first quantized group (others pass nullptr).
template <typename IdxT>
__device__ void send_tokens_fp8_direct(const DispatchParams& p, const SendWindow& win,
                                       const SendUnits& units, const int32_t* rows,
                                       int64_t rows_pair0, int64_t chunk_blocks,
                                       const Tracer& trace) {
  const CommParams& c = p.comm;
  const int lane = lane_id();
  const int sub = lane / kQuantLanesPerBlock;    // block of a pass
  const int piece = lane % kQuantLanesPerBlock;  // 16 elements of it
  const int elem_bytes = dtype_bytes(p.x_dtype);
  const int64_t row_blocks = p.x_row_bytes / (static_cast<int64_t>(kFp8Block) * elem_bytes);
  const uint8_t* x = static_cast<const uint8_t*>(p.x);
  constexpr int kGroupBlocks = kDirectPasses * kQuantBlocksPerPass;
  bool first_item = true;

  for (int64_t u = units.first; u < units.end; u += units.step) {
    const int64_t n = units.token(u);
    const int64_t b_begin = units.parts > 1 ? units.part(u) * chunk_blocks : 0;
    const int64_t b_end =
        units.parts > 1 ? min(b_begin + chunk_blocks, row_blocks) : row_blocks;
    const uint8_t* src = x + n * p.x_row_bytes;

    // The lane's block of pass q of the group at g0, and its piece's source address.
    auto lane_block = [&](int64_t g0, int q) { return g0 + q * kQuantBlocksPerPass + sub; };
    auto load_group = [&](int64_t g0, LanePiece (&raw)[kDirectPasses]) {
#pragma unroll
      for (int q = 0; q < kDirectPasses; ++q) {
        const int64_t b = lane_block(g0, q);
        if (b < b_end) {
          load_lane_piece(src + (b * kFp8Block + piece * kQuantElemsPerLane) * elem_bytes,
                          p.x_dtype, &raw[q]);
        }
      }
    };
    // x's first group first: its loads travel while the destinations are looked up and the
    // metadata is written (each of those waits for a load of its own).
    LanePiece next[kDirectPasses];
    load_group(b_begin, next);
    const PairDest mine = unit_dest<IdxT>(p, units, u, lane, rows, rows_pair0);
    if (units.parts == 1 || units.part(u) == 0) send_metadata(p, win, n, mine);
    // Lane k: slot k's row and its scales (nullptr: no row).
    uint8_t* my_row = row_address(c, win, mine, p.out_row_bytes);
    float* my_scales = mine.row < 0 ? nullptr
                                    : at_offset<float>(peer_base(c, mine.peer), win.off_scales) +
                                          static_cast<int64_t>(mine.row) * p.scale_cols;
    for (int64_t g0 = b_begin; g0 < b_end; g0 += kGroupBlocks) {  // uniform over the warp
      LanePiece cur[kDirectPasses];
#pragma unroll
      for (int q = 0; q < kDirectPasses; ++q) cur[q] = next[q];
      if (g0 + kGroupBlocks < b_end) load_group(g0 + kGroupBlocks, next);

      float v[kDirectPasses][kQuantElemsPerLane];
      float amax[kDirectPasses];
#pragma unroll
      for (int q = 0; q < kDirectPasses; ++q) {
        amax[q] = 0.f;
        if (lane_block(g0, q) < b_end) {
          piece_to_float(cur[q], p.x_dtype, v[q]);
#pragma unroll
          for (int i = 0; i < kQuantElemsPerLane; ++i) amax[q] = fmaxf(amax[q], fabsf(v[q][i]));
        }
      }
      reduce_block_amax(amax);
      uint4 packed[kDirectPasses];
      float scale[kDirectPasses];
#pragma unroll
      for (int q = 0; q < kDirectPasses; ++q) packed[q] = quantize16_e4m3(v[q], amax[q], &scale[q]);
      if (first_item) trace.mark(kTrace_dispatch_first_quantized);
      first_item = false;

      for (int k = 0; k < p.num_topk; ++k) {
        uint8_t* row = reinterpret_cast<uint8_t*>(
            __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(my_row), k));
        float* scales = reinterpret_cast<float*>(
            __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(my_scales), k));
        if (row == nullptr) continue;  // uniform over the warp
#pragma unroll
        for (int q = 0; q < kDirectPasses; ++q) {
          const int64_t b = lane_block(g0, q);
          if (b >= b_end) continue;
          *reinterpret_cast<uint4*>(row + b * kFp8Block + piece * kQuantElemsPerLane) = packed[q];
          if (piece == 0) scales[b] = scale[q];
        }
      }
    }
  }
}

}  // namespace swiftep
