// Launcher of the throughput dispatch: the counts kernel (one block, counts_kernel.cuh), then
// the data kernel (data_kernel.cuh), then with dispatch_fanout the fan-out of the rows peers
// sent once per token (fanout_kernel.cuh).
#include <cuda_runtime_api.h>

#include "ops/dispatch/counts_kernel.cuh"
#include "ops/dispatch/data_kernel.cuh"
#include "ops/dispatch/fanout_kernel.cuh"
#include "ops/launch_utils.h"
#include "swiftep/launchers.h"

namespace swiftep {

namespace {

// The launch configuration of one throughput dispatch.
struct DispatchConfig {
  SmemCheck smem;
  int counts_warps;     // warps of the counts kernel (per-warp histograms must fit)
  int64_t counts_smem;
  DispatchShape shape;  // of the data kernel
  int64_t data_smem;
  int64_t data_blocks;
};

bool x_is_bulk_aligned(const DispatchParams& p) {
  return reinterpret_cast<uintptr_t>(p.x) % kBulkAlign == 0 && p.x_row_bytes % kBulkAlign == 0;
}

template <typename IdxT>
cudaError_t configure_dispatch(const DispatchParams& p, DispatchConfig* out) {
  DispatchConfig cfg{};
  KernelSmem counts_info{}, data_info{};
  cudaError_t err = kernel_smem(reinterpret_cast<const void*>(&dispatch_counts_kernel<IdxT>),
                                &counts_info);
  if (err != cudaSuccess) return err;
  // both data kernels have the same shared memory (kFanout changes which rows are stored only)
  err = kernel_smem(reinterpret_cast<const void*>(&dispatch_data_kernel<IdxT, false>),
                    &data_info);
  if (err != cudaSuccess) return err;
  // Most warps whose histograms fit: more warps shorten the serial ranges of the ranking.
  for (int warps = kMaxWarpsPerBlock; warps >= 1 && cfg.counts_warps == 0; warps /= 2) {
    const int64_t bytes = dispatch_counts_smem_ints(warps, p.comm.num_experts) * 4;
    if (bytes <= counts_info.max_dynamic) {
      cfg.counts_warps = warps;
      cfg.counts_smem = bytes;
    }
  }
  cfg.smem = {true, 0, 0};
  if (cfg.counts_warps == 0) {
    cfg.smem = {false, dispatch_counts_smem_ints(1, p.comm.num_experts) * 4,
                counts_info.max_dynamic};
  }
  cfg.shape.use_tma = x_is_bulk_aligned(p);
  if (cfg.shape.use_tma) {
    const int64_t cap = data_info.max_dynamic / (kDispatchWarps * kDispatchStages);
    cfg.shape.stage_bytes =
        dispatch_chunk_bytes(p, cap < kMaxDispatchStageBytes ? cap : kMaxDispatchStageBytes);
    cfg.data_smem = cfg.shape.stage_bytes * kDispatchWarps * kDispatchStages;
    if (cfg.shape.stage_bytes == 0 && cfg.smem.ok)
      cfg.smem = {false, 16 * kDispatchWarps * kDispatchStages, data_info.max_dynamic};
  } else if (p.quantize_fp8) {  // the binding requires an aligned x: never reached
    return cudaErrorInvalidValue;
  }
  // Enough blocks for one unit (token, or (token, slot) pair for small calls: see SendUnits)
  // per warp, at most num_sms; at least one (the handshake).
  cfg.shape.per_token =
      units_per_token(p.num_tokens, p.num_topk, static_cast<int64_t>(p.num_sms) * kDispatchWarps);
  cfg.data_blocks = clamp_blocks(
      ceil_div(static_cast<int64_t>(p.num_tokens) * cfg.shape.per_token, kDispatchWarps),
      p.num_sms);
  *out = cfg;
  return cudaSuccess;
}

// Phase 3 of dispatch_fanout (fanout_kernel.cuh), on this call's SM budget.
cudaError_t launch_fanout(const DispatchParams& p, cudaStream_t stream) {
  const int64_t smem = kFanoutCopyWarps * kFanoutWarpBytes;
  cudaError_t err = ensure_dynamic_smem(reinterpret_cast<const void*>(&fanout_copy_kernel), smem);
  if (err != cudaSuccess) return err;
  fanout_lowest_kernel<<<static_cast<unsigned>(clamp_blocks(
                             ceil_div(p.comm.capacity, int64_t{kFanoutLowestThreads}), p.num_sms)),
                         kFanoutLowestThreads, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t rows_per_block = int64_t{kFanoutCopyWarps} * kWarpSize;
  fanout_copy_kernel<<<static_cast<unsigned>(clamp_blocks(
                           ceil_div(p.comm.capacity, rows_per_block), p.num_sms)),
                       kFanoutCopyWarps * kWarpSize, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename IdxT, bool kFanout>
LaunchResult launch(const DispatchParams& p, cudaStream_t stream) {
  DispatchConfig cfg{};
  cudaError_t err = configure_dispatch<IdxT>(p, &cfg);
  if (err != cudaSuccess) return launch_result(err);
  if (!cfg.smem.ok) return smem_refused(cfg.smem);
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(&dispatch_counts_kernel<IdxT>),
                            cfg.counts_smem);
  if (err != cudaSuccess) return launch_result(err);
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(&dispatch_data_kernel<IdxT, kFanout>),
                            cfg.data_smem);
  if (err != cudaSuccess) return launch_result(err);
  dispatch_counts_kernel<IdxT><<<1, cfg.counts_warps * kWarpSize, cfg.counts_smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return launch_result(err);
  dispatch_data_kernel<IdxT, kFanout><<<static_cast<unsigned>(cfg.data_blocks),
                                         kDispatchThreads, cfg.data_smem, stream>>>(p, cfg.shape);
  err = cudaGetLastError();
  if (err == cudaSuccess && kFanout) err = launch_fanout(p, stream);
  return launch_result(err);
}

}  // namespace

LaunchResult launch_dispatch(const DispatchParams& params, cudaStream_t stream) {
  // one rank has no peer to send once to
  const bool fanout = params.comm.dispatch_fanout != 0 && params.comm.world_size > 1;
  if (fanout) {
    return params.topk_idx_is_int64 ? launch<int64_t, true>(params, stream)
                                    : launch<int32_t, true>(params, stream);
  }
  return params.topk_idx_is_int64 ? launch<int64_t, false>(params, stream)
                                  : launch<int32_t, false>(params, stream);
}

}  // namespace swiftep
