// Launchers of both combines (throughput and low latency: one kernel, two windows) and of the
// staging copy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "../kernels/combine.cuh"
#include "launch_utils.h"
#include "swiftep/launchers.h"

namespace swiftep {

namespace {

struct CombineLaunch {
  SmemCheck check;
  bool use_tma;         // window pitch and y are 16-byte aligned
  int64_t chunk_bytes;  // row chunk of one item
  int64_t smem;
  int64_t blocks;
};

template <typename T, typename IdxT>
cudaError_t plan_combine(const CombineParams& p, CombineLaunch* out) {
  CombineLaunch plan{};
  KernelSmem info{};
  cudaError_t err = kernel_smem(reinterpret_cast<const void*>(&combine_kernel<T, IdxT>), &info);
  if (err != cudaSuccess) return err;
  plan.check = {true, 0, info.max_dynamic};
  plan.use_tma = p.out_row_bytes % kBulkAlign == 0 &&
                 reinterpret_cast<uintptr_t>(p.y) % kBulkAlign == 0;
  int64_t chunks = 1;
  if (plan.use_tma) {
    int64_t cap =
        info.max_dynamic / (static_cast<int64_t>(kCombineWarps) * kCombineStages * p.num_topk);
    if (cap > kMaxCombineChunkBytes) cap = kMaxCombineChunkBytes;
    // A call with fewer (token, chunk) items than the grid has warps (decode) cuts rows finer,
    // down to one 16-byte vector per lane, so every warp reduces a piece: a warp's latency is
    // its K bulk loads plus its reduction, both shorter for a smaller chunk.
    const int64_t total_warps = static_cast<int64_t>(p.num_sms) * kCombineWarps;
    if (cap >= kBulkAlign && p.num_tokens > 0 &&
        p.num_tokens * ceil_div(p.out_row_bytes, cap) < total_warps) {
      const int64_t wanted_chunks = ceil_div(total_warps, p.num_tokens);
      int64_t small = round_up(ceil_div(p.out_row_bytes, wanted_chunks), kBulkAlign);
      if (small < kMinCombineChunkBytes) small = kMinCombineChunkBytes;
      if (small < cap) cap = small;
    }
    plan.chunk_bytes = even_chunk_bytes(p.out_row_bytes, cap);
    plan.smem = static_cast<int64_t>(kCombineWarps) * kCombineStages * p.num_topk *
                plan.chunk_bytes;
    if (plan.chunk_bytes == 0) {
      plan.check = {false, static_cast<int64_t>(kCombineWarps) * kCombineStages * p.num_topk * 16,
                    info.max_dynamic};
    } else {
      chunks = ceil_div(p.out_row_bytes, plan.chunk_bytes);
    }
  }
  plan.blocks = clamp_blocks(ceil_div(static_cast<int64_t>(p.num_tokens) * chunks, kCombineWarps),
                             p.num_sms);
  *out = plan;
  return cudaSuccess;
}

template <typename T, typename IdxT>
cudaError_t launch_typed(const CombineParams& p, const CombineWindow& win, cudaStream_t stream) {
  CombineLaunch plan{};
  cudaError_t err = plan_combine<T, IdxT>(p, &plan);
  if (err != cudaSuccess) return err;
  if (!plan.check.ok) return cudaErrorInvalidValue;
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(&combine_kernel<T, IdxT>), plan.smem);
  if (err != cudaSuccess) return err;
  combine_kernel<T, IdxT><<<static_cast<unsigned>(plan.blocks), kCombineThreads, plan.smem,
                            stream>>>(p, win, plan.chunk_bytes, plan.use_tma);
  return cudaGetLastError();
}

template <typename IdxT>
cudaError_t launch_by_dtype(const CombineParams& p, const CombineWindow& win,
                            cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kBFloat16: return launch_typed<__nv_bfloat16, IdxT>(p, win, stream);
    case DType::kFloat16: return launch_typed<__half, IdxT>(p, win, stream);
    case DType::kFloat32: return launch_typed<float, IdxT>(p, win, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_window(const CombineParams& p, const CombineWindow& win, cudaStream_t stream) {
  return p.topk_idx_is_int64 ? launch_by_dtype<int64_t>(p, win, stream)
                             : launch_by_dtype<int32_t>(p, win, stream);
}

template <typename IdxT>
SmemCheck smem_by_dtype(const CombineParams& p) {
  CombineLaunch plan{};
  cudaError_t err = cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kBFloat16: err = plan_combine<__nv_bfloat16, IdxT>(p, &plan); break;
    case DType::kFloat16: err = plan_combine<__half, IdxT>(p, &plan); break;
    case DType::kFloat32: err = plan_combine<float, IdxT>(p, &plan); break;
  }
  if (err != cudaSuccess) return {false, 0, 0};
  return plan.check;
}

}  // namespace

SmemCheck combine_smem(const CombineParams& params) {
  return params.topk_idx_is_int64 ? smem_by_dtype<int64_t>(params)
                                  : smem_by_dtype<int32_t>(params);
}

cudaError_t launch_combine(const CombineParams& params, cudaStream_t stream) {
  const CommParams& c = params.comm;
  const CombineWindow win{c.off_combine_x, c.off_combine_flags, kEpochThroughput, kWaitCombine,
                          c.capacity};
  return launch_window(params, win, stream);
}

cudaError_t launch_low_latency_combine(const CombineParams& params, cudaStream_t stream) {
  const CommParams& c = params.comm;
  const CombineWindow win{c.off_ll_combine_x, c.off_ll_combine_flags, kEpochLowLatency,
                          kWaitLlCombine, c.ll_rows_per_expert * c.num_local_experts};
  return launch_window(params, win, stream);
}

cudaError_t launch_copy_rows(const CopyRowsParams& params, cudaStream_t stream) {
  if (params.num_groups <= 0) return cudaSuccess;
  const int64_t blocks = clamp_blocks(params.num_sms, params.num_sms);
  copy_rows_kernel<<<static_cast<unsigned>(blocks), kCopyThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace swiftep
