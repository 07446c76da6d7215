// Shared by both dispatches: the fused FP8 quantizer (the DeepSeek-V3 recipe of
// swiftep/protocol.h's kFp8*), on a lane's 16 elements of a 128-channel block. The staged send
// quantizes a chunk in shared memory with it (quantize_stage_fp8); the low-latency FP8 send
// quantizes in registers (ops/send/fp8_direct.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "device/common.cuh"
#include "swiftep/params.h"

namespace swiftep {

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
// scale = a * float32(1 / 448) (ops/protocol.py). Returns the 16 e4m3 bytes; *scale the block's
// scale.
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

}  // namespace swiftep
