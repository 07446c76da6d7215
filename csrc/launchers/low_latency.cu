// Launcher of the low-latency dispatch (one kernel). Its combine is in combine.cu.
#include <cuda_runtime_api.h>

#include "../kernels/low_latency.cuh"
#include "launch_utils.h"
#include "swiftep/launchers.h"

namespace swiftep {

namespace {

struct LowLatencyLaunch {
  SmemCheck check;
  int64_t blocks;
  int tokens_per_block;  // contiguous token range of each block
  bool use_tma;
  int64_t stage_bytes;
  int64_t smem;
};

template <typename IdxT>
cudaError_t plan_low_latency(const DispatchParams& p, LowLatencyLaunch* out) {
  LowLatencyLaunch plan{};
  KernelSmem info{};
  cudaError_t err = kernel_smem(reinterpret_cast<const void*>(&ll_dispatch_kernel<IdxT>), &info);
  if (err != cudaSuccess) return err;
  // One token per warp when num_sms allows: the latency of a call is one token's fan-out.
  plan.blocks = clamp_blocks(ceil_div(p.num_tokens, kDispatchWarps), p.num_sms);
  plan.tokens_per_block = static_cast<int>(ceil_div(p.num_tokens, plan.blocks));
  const int64_t fixed =
      round_up(ll_dispatch_smem_ints(p.comm.num_experts, plan.tokens_per_block, p.num_topk) * 4,
               kSmemAlign);
  plan.check = {true, fixed, info.max_dynamic};
  plan.use_tma = reinterpret_cast<uintptr_t>(p.x) % kBulkAlign == 0 &&
                 p.x_row_bytes % kBulkAlign == 0;
  plan.smem = fixed;
  if (plan.use_tma) {
    const int64_t budget = info.max_dynamic - fixed;
    const int64_t cap = budget > 0 ? budget / (kDispatchWarps * kDispatchStages) : 0;
    plan.stage_bytes = even_chunk_bytes(p.x_row_bytes,
                                        cap < kMaxDispatchStageBytes ? cap : kMaxDispatchStageBytes);
    plan.smem = fixed + plan.stage_bytes * kDispatchWarps * kDispatchStages;
    if (plan.stage_bytes == 0) plan.check = {false, fixed + 16 * kDispatchWarps * kDispatchStages,
                                             info.max_dynamic};
  }
  if (fixed > info.max_dynamic) plan.check = {false, fixed, info.max_dynamic};
  *out = plan;
  return cudaSuccess;
}

template <typename IdxT>
cudaError_t launch(const DispatchParams& p, cudaStream_t stream) {
  LowLatencyLaunch plan{};
  cudaError_t err = plan_low_latency<IdxT>(p, &plan);
  if (err != cudaSuccess) return err;
  if (!plan.check.ok || p.comm.ll_rows_per_expert <= 0) return cudaErrorInvalidValue;
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(&ll_dispatch_kernel<IdxT>), plan.smem);
  if (err != cudaSuccess) return err;
  ll_dispatch_kernel<IdxT><<<static_cast<unsigned>(plan.blocks), kDispatchThreads, plan.smem,
                             stream>>>(p, plan.stage_bytes, plan.use_tma, plan.tokens_per_block);
  return cudaGetLastError();
}

}  // namespace

SmemCheck low_latency_dispatch_smem(const DispatchParams& params) {
  LowLatencyLaunch plan{};
  const cudaError_t err = params.topk_idx_is_int64 ? plan_low_latency<int64_t>(params, &plan)
                                                   : plan_low_latency<int32_t>(params, &plan);
  if (err != cudaSuccess) return {false, 0, 0};
  return plan.check;
}

cudaError_t launch_low_latency_dispatch(const DispatchParams& params, cudaStream_t stream) {
  return params.topk_idx_is_int64 ? launch<int64_t>(params, stream)
                                  : launch<int32_t>(params, stream);
}

}  // namespace swiftep
