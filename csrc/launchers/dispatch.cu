// Launcher of the throughput dispatch: counts/rows kernel (one block), then the data kernel.
#include <cuda_runtime_api.h>

#include "../kernels/dispatch.cuh"
#include "../kernels/layout.cuh"
#include "launch_utils.h"
#include "swiftep/launchers.h"

namespace swiftep {

namespace {

struct DispatchLaunch {
  SmemCheck check;
  int counts_warps;      // warps of the counts kernel (per-warp histograms must fit)
  int64_t counts_smem;
  bool use_tma;          // x and its rows are 16-byte aligned
  int64_t stage_bytes;   // one pipeline stage of the data kernel
  int64_t data_smem;
};

bool x_is_bulk_aligned(const DispatchParams& p) {
  return reinterpret_cast<uintptr_t>(p.x) % kBulkAlign == 0 && p.x_row_bytes % kBulkAlign == 0;
}

template <typename IdxT>
cudaError_t plan_dispatch(const DispatchParams& p, DispatchLaunch* out) {
  DispatchLaunch plan{};
  KernelSmem counts_info{}, data_info{};
  cudaError_t err = kernel_smem(reinterpret_cast<const void*>(&dispatch_counts_kernel<IdxT>),
                                &counts_info);
  if (err != cudaSuccess) return err;
  err = kernel_smem(reinterpret_cast<const void*>(&dispatch_data_kernel<IdxT>), &data_info);
  if (err != cudaSuccess) return err;
  // Most warps whose histograms fit: more warps shorten the serial ranges of the ranking.
  for (int warps = kMaxWarpsPerBlock; warps >= 1 && plan.counts_warps == 0; warps /= 2) {
    const int64_t bytes = dispatch_counts_smem_ints(warps, p.comm.num_experts) * 4;
    if (bytes <= counts_info.max_dynamic) {
      plan.counts_warps = warps;
      plan.counts_smem = bytes;
    }
  }
  plan.check = {true, 0, 0};
  if (plan.counts_warps == 0) {
    plan.check = {false, dispatch_counts_smem_ints(1, p.comm.num_experts) * 4,
                  counts_info.max_dynamic};
  }
  plan.use_tma = x_is_bulk_aligned(p);
  if (plan.use_tma) {
    const int64_t cap = data_info.max_dynamic / (kDispatchWarps * kDispatchStages);
    plan.stage_bytes =
        dispatch_chunk_bytes(p, cap < kMaxDispatchStageBytes ? cap : kMaxDispatchStageBytes);
    plan.data_smem = plan.stage_bytes * kDispatchWarps * kDispatchStages;
    if (plan.stage_bytes == 0 && plan.check.ok)
      plan.check = {false, 16 * kDispatchWarps * kDispatchStages, data_info.max_dynamic};
  } else if (p.quantize_fp8) {  // the binding requires an aligned x: never reached
    plan.check = {false, 0, 0};
  }
  *out = plan;
  return cudaSuccess;
}

template <typename IdxT>
cudaError_t launch(const DispatchParams& p, cudaStream_t stream) {
  DispatchLaunch plan{};
  cudaError_t err = plan_dispatch<IdxT>(p, &plan);
  if (err != cudaSuccess) return err;
  if (!plan.check.ok) return cudaErrorInvalidValue;
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(&dispatch_counts_kernel<IdxT>),
                            plan.counts_smem);
  if (err != cudaSuccess) return err;
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(&dispatch_data_kernel<IdxT>),
                            plan.data_smem);
  if (err != cudaSuccess) return err;
  dispatch_counts_kernel<IdxT>
      <<<1, plan.counts_warps * kWarpSize, plan.counts_smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // Enough blocks for one unit (token, or (token, slot) pair for small calls: see SendUnits)
  // per warp, at most num_sms; at least one (the handshake).
  const int per_token =
      units_per_token(p.num_tokens, p.num_topk, static_cast<int64_t>(p.num_sms) * kDispatchWarps);
  const int64_t blocks = clamp_blocks(
      ceil_div(static_cast<int64_t>(p.num_tokens) * per_token, kDispatchWarps), p.num_sms);
  dispatch_data_kernel<IdxT><<<static_cast<unsigned>(blocks), kDispatchThreads, plan.data_smem,
                               stream>>>(p, plan.stage_bytes, plan.use_tma, per_token);
  return cudaGetLastError();
}

}  // namespace

SmemCheck dispatch_smem(const DispatchParams& params) {
  DispatchLaunch plan{};
  const cudaError_t err = params.topk_idx_is_int64 ? plan_dispatch<int64_t>(params, &plan)
                                                   : plan_dispatch<int32_t>(params, &plan);
  if (err != cudaSuccess) return {false, 0, 0};
  return plan.check;
}

cudaError_t launch_dispatch(const DispatchParams& params, cudaStream_t stream) {
  return params.topk_idx_is_int64 ? launch<int64_t>(params, stream)
                                  : launch<int32_t>(params, stream);
}

}  // namespace swiftep
