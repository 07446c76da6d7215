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

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

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
// Smallest chunk a small call splits a pair's row into (SendUnits parts): below it, a warp's
// fixed cost per unit (destination, barrier, bulk-copy issue) outweighs the bytes it moves.
constexpr int64_t kMinDispatchChunkBytes = 512;

// Where a path's rows land (byte offsets of a workspace's regions).
struct SendWindow {
  int64_t off_x;
  int64_t off_scales;
  int64_t off_src;
  int64_t off_weights;
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

__device__ __forceinline__ uint8_t* row_address(const CommParams& c, const SendWindow& win,
                                                PairDest dest, int64_t pitch) {
  if (dest.row < 0) return nullptr;
  return at_offset<uint8_t>(peer_base(c, dest.peer), win.off_x) + dest.row * pitch;
}

// ------------------------------------------------------------------- fused FP8 quantization
// Lanes share a 128-channel block 8 at a time, 16 elements each: a warp quantizes 4 blocks per
// pass with a 3-step shuffle reduction (one 32-lane reduction per block was the kernel's
// bottleneck: a latency chain of ~1300 cycles per 4 blocks, docs/perf-notes.md).
constexpr int kQuantLanesPerBlock = 8;
constexpr int kQuantElemsPerLane = kFp8Block / kQuantLanesPerBlock;  // 16
constexpr int kQuantBlocksPerPass = kWarpSize / kQuantLanesPerBlock;  // 4
constexpr int kQuantPasses = 2;  // passes in flight at once, so their latency chains overlap
static_assert(kFp8Block % kQuantLanesPerBlock == 0, "whole elements per lane");

// Raw bytes of one lane's kQuantElemsPerLane elements of x's dtype (16-bit: 32 bytes, fp32: 64).
struct LanePiece {
  uint4 w[4];
};

// Loads a lane's piece (16-byte aligned) from shared or global memory.
__device__ __forceinline__ void load_lane_piece(const uint8_t* src, DType dtype, LanePiece* out) {
  const int words = dtype == DType::kFloat32 ? 4 : 2;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (i < words) out->w[i] = reinterpret_cast<const uint4*>(src)[i];
  }
}

// A lane's piece as floats.
__device__ __forceinline__ void piece_to_float(const LanePiece& raw, DType dtype, float* v) {
  if (dtype == DType::kFloat32) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[4 * i] = __uint_as_float(raw.w[i].x), v[4 * i + 1] = __uint_as_float(raw.w[i].y);
      v[4 * i + 2] = __uint_as_float(raw.w[i].z), v[4 * i + 3] = __uint_as_float(raw.w[i].w);
    }
    return;
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint32_t words[4] = {raw.w[half].x, raw.w[half].y, raw.w[half].z, raw.w[half].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f;
      if (dtype == DType::kBFloat16) {
        __nv_bfloat162 h;
        memcpy(&h, &words[i], 4);
        f = __bfloat1622float2(h);
      } else {
        __half2 h;
        memcpy(&h, &words[i], 4);
        f = __half22float2(h);
      }
      v[8 * half + 2 * i] = f.x;
      v[8 * half + 2 * i + 1] = f.y;
    }
  }
}

// Each lane's amax[q] becomes the max over its group of kQuantLanesPerBlock lanes (the lanes
// sharing a 128-channel block); the N reductions interleave so their latency chains overlap.
// Whole warp.
template <int N>
__device__ __forceinline__ void reduce_block_amax(float (&amax)[N]) {
#pragma unroll
  for (int m = 1; m < kQuantLanesPerBlock; m <<= 1) {
#pragma unroll
    for (int q = 0; q < N; ++q) amax[q] = fmaxf(amax[q], __shfl_xor_sync(kFullMask, amax[q], m));
  }
}

// The FP8 recipe for one lane's kQuantElemsPerLane values of a block whose amax is `amax`: the
// DeepSeek-V3 recipe exactly as torch_swiftep.fp8.quantize_fp8 computes it (same IEEE-rounded
// operations, so the bytes are identical): a = max(amax, floor), q = e4m3(v * (448 / a)),
// scale = a * float32(1 / 448) (plan.py). Returns the 16 e4m3 bytes; *scale the block's scale.
__device__ __forceinline__ uint4 quantize16_e4m3(const float* v, float amax, float* scale) {
  const float a = fmaxf(amax, kFp8AmaxFloor);
  *scale = __fmul_rn(a, kFp8ScalePerAmax);
  const float inverse = __fdiv_rn(kFp8Max, a);
  uint32_t packed[kQuantElemsPerLane / 4];
#pragma unroll
  for (int i = 0; i < kQuantElemsPerLane / 4; ++i) {
    const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(
        make_float2(__fmul_rn(v[4 * i], inverse), __fmul_rn(v[4 * i + 1], inverse)),
        __NV_SATFINITE, __NV_E4M3);
    const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(
        make_float2(__fmul_rn(v[4 * i + 2], inverse), __fmul_rn(v[4 * i + 3], inverse)),
        __NV_SATFINITE, __NV_E4M3);
    packed[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  return make_uint4(packed[0], packed[1], packed[2], packed[3]);
}

// Quantizes, in place, a staged chunk of `blocks` 128-channel blocks of x (elem_bytes each)
// to FP8 e4m3 with one float32 scale per block (quantize16_e4m3). Lane l holds elements
// [16 (l % 8), + 16) of block (l / 8) of each pass.
// Block b's 128 output bytes land at stage + 128 * b, which only overlaps input of blocks
// <= b, all loaded by every lane before the passes' __syncwarp.
// Returns block (lane)'s scale to lane `lane` (blocks <= 32). Whole warp.
__device__ __forceinline__ float quantize_stage_fp8(uint8_t* stage, int blocks, DType dtype,
                                                    int elem_bytes) {
  const int lane = lane_id();
  const int sub = lane / kQuantLanesPerBlock;   // block of the pass
  const int piece = lane % kQuantLanesPerBlock;  // 16 elements of it
  constexpr int kStep = kQuantBlocksPerPass * kQuantPasses;
  float my_scale = 0.f;
  for (int b0 = 0; b0 < blocks; b0 += kStep) {
    float v[kQuantPasses][kQuantElemsPerLane];
    float amax[kQuantPasses];
#pragma unroll
    for (int q = 0; q < kQuantPasses; ++q) {
      const int b = b0 + q * kQuantBlocksPerPass + sub;
      amax[q] = 0.f;
      if (b < blocks) {
        LanePiece raw;
        load_lane_piece(
            stage + (static_cast<int64_t>(b) * kFp8Block + piece * kQuantElemsPerLane) * elem_bytes,
            dtype, &raw);
        piece_to_float(raw, dtype, v[q]);
#pragma unroll
        for (int i = 0; i < kQuantElemsPerLane; ++i) amax[q] = fmaxf(amax[q], fabsf(v[q][i]));
      }
    }
    reduce_block_amax(amax);
    __syncwarp();  // every lane's loads are done before any lane overwrites
#pragma unroll
    for (int q = 0; q < kQuantPasses; ++q) {
      const int first = b0 + q * kQuantBlocksPerPass;  // block of lanes 0..7 in this pass
      const int b = first + sub;
      float scale;
      const uint4 packed = quantize16_e4m3(v[q], amax[q], &scale);
      if (b < blocks) {
        *reinterpret_cast<uint4*>(stage + static_cast<int64_t>(b) * kFp8Block +
                                  piece * kQuantElemsPerLane) = packed;
      }
      // Block `lane`'s scale to lane `lane`: it sits in lane 8 * (lane - first).
      const float from = __shfl_sync(kFullMask, scale,
                                     ((lane - first) & (kQuantBlocksPerPass - 1)) *
                                         kQuantLanesPerBlock);
      if (lane >= first && lane < first + kQuantBlocksPerPass) my_scale = from;
    }
  }
  fence_proxy_async_shared_cta();  // the bulk stores (async proxy) read what lanes wrote
  __syncwarp();
  return my_scale;
}

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

// Sends this warp's units. stages: this warp's kDispatchStages * stage_bytes of shared memory;
// bars: its kDispatchStages mbarriers (initialised). use_tma false: plain warp copies (x or its
// rows are not 16-byte aligned; never with quantize_fp8, which the launchers refuse).
// stage_bytes: a chunk of x's row; with quantize_fp8 a whole number of 128-channel blocks, at
// most 32 of them.
// units.parts > 1: stage_bytes makes the row exactly `parts` chunks. trace: warp 0 of block 0
// stamps its first item (others pass Tracer{nullptr}).
template <typename IdxT>
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
    for (int64_t t = 0; t < num_mine; ++t) {  // (the launchers use parts == 1 here)
      const int64_t u = units.first + t * units.step;
      const int64_t n = units.token(u);
      const PairDest mine = unit_dest<IdxT>(p, units, u, lane, rows, rows_pair0);
      send_metadata(p, win, n, mine);
      for (int k = 0; k < p.num_topk; ++k) {
        const PairDest dest{__shfl_sync(kFullMask, mine.row, k),
                            __shfl_sync(kFullMask, mine.peer, k)};
        if (dest.row >= 0)
          warp_copy_bytes(row_address(c, win, dest, pitch), x + n * row_bytes, row_bytes, lane);
      }
    }
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

// ------------------------------------------------------------- throughput dispatch, phase 2
// num_sms blocks; per_token units per token (SendUnits). Reads the epoch and token_rows phase 1
// left; sends; the last block releases data_flags[rank] = epoch on every peer and waits until
// every peer's rows have arrived here.
template <typename IdxT>
__global__ void __launch_bounds__(kDispatchThreads)
    dispatch_data_kernel(const __grid_constant__ DispatchParams p, int64_t stage_bytes,
                         bool use_tma, int per_token) {
  __shared__ __align__(8) uint64_t bars[kDispatchWarps][kDispatchStages];
  const CommParams& c = p.comm;
  const int64_t epoch = ctrl_epoch(c)[kEpochThroughput];  // bumped by phase 1 of this call
  const SendWindow win{c.off_recv_x, c.off_recv_scales, c.off_recv_src, c.off_recv_weights};
  init_warp_barriers(bars[warp_id()], kDispatchStages);
  const int64_t num_warps_total = static_cast<int64_t>(gridDim.x) * kDispatchWarps;
  const int64_t global_warp = static_cast<int64_t>(blockIdx.x) * kDispatchWarps + warp_id();
  uint8_t* stages = dynamic_smem() + warp_id() * kDispatchStages * stage_bytes;
  const SendUnits units{global_warp, num_warps_total,
                        static_cast<int64_t>(p.num_tokens) * per_token, per_token, 1,
                        per_token != 1};
  send_tokens<IdxT>(p, win, units, p.token_rows, 0, stages, bars[warp_id()], stage_bytes,
                    use_tma, Tracer{nullptr});
  finish_bulk_stores();
  if (!block_done_is_last(c, kDoneDispatchData)) return;
  block_release_to_all_peers(c, c.off_data_flags, epoch);
  block_wait_all_peers(c, at_offset<int64_t>(c.workspace, c.off_data_flags), epoch, kWaitData);
}

}  // namespace swiftep
