// The kernel of the local swiglu_rows op: the SwiGLU between an expert MLP's two grouped GEMMs,
// over the rows a dispatch window holds (their count is read here, on the device), not over the
// window's capacity. Element-wise and memory-bound: each thread moves 16-byte vectors when the
// row width allows it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "device/common.cuh"
#include "swiftep/params.h"

namespace swiftep {

template <typename T>
struct SwigluElem;

template <>
struct SwigluElem<__nv_bfloat16> {
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct SwigluElem<__half> {
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct SwigluElem<float> {
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};

// silu(g) * u as torch evaluates `F.silu(gate) * up` in dtype T: silu in float32
// (x / (1 + exp(-x)), IEEE division and expf, as its CUDA kernel), rounded to T; then the
// product of the two T values in float32, rounded to T. Bit for bit, the torch expression.
template <typename T>
__device__ __forceinline__ T swiglu_one(T g, T u) {
  using E = SwigluElem<T>;
  const float x = E::to_float(g);
  const T silu = E::from_float(x / (1.0f + expf(-x)));
  return E::from_float(E::to_float(silu) * E::to_float(u));
}

// kVec elements of T per thread and step (16 bytes when the width allows it, else 1).
template <typename T, int kVec>
__global__ void swiglu_rows_kernel(const __grid_constant__ SwigluRowsParams p) {
  int64_t valid = p.row_ends[p.num_row_ends - 1];
  valid = valid < 0 ? 0 : (valid > p.rows ? p.rows : valid);
  const int64_t vecs_per_row = p.width / kVec;
  const int64_t total = valid * vecs_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const T* in = static_cast<const T*>(p.gate_up);
  T* out = static_cast<T*>(p.out);
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
       v += stride) {
    const int64_t row = v / vecs_per_row;
    const int64_t col = (v - row * vecs_per_row) * kVec;
    const T* gate = in + row * 2 * p.width + col;
    const T* up = gate + p.width;
    T* dst = out + row * p.width + col;
    if constexpr (kVec * sizeof(T) == 16) {
      union Vec {
        uint4 raw;
        T elems[kVec];
      } g, u, o;
      g.raw = __ldg(reinterpret_cast<const uint4*>(gate));
      u.raw = __ldg(reinterpret_cast<const uint4*>(up));
#pragma unroll
      for (int i = 0; i < kVec; ++i) o.elems[i] = swiglu_one<T>(g.elems[i], u.elems[i]);
      *reinterpret_cast<uint4*>(dst) = o.raw;
    } else {
      *dst = swiglu_one<T>(gate[0], up[0]);
    }
  }
}

}  // namespace swiftep
