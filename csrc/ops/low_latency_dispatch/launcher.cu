// Launcher of the low-latency dispatch (one kernel, kernel.cuh). Its combine is launched by
// ops/combine/launcher.cu.
#include <cuda_runtime_api.h>

#include "ops/launch_utils.h"
#include "ops/low_latency_dispatch/kernel.cuh"
#include "swiftep/launchers.h"

namespace swiftep {

namespace {

// The launch configuration of one low-latency dispatch.
struct LowLatencyConfig {
  SmemCheck smem;
  int64_t blocks;
  int64_t smem_bytes;
  bool direct_fp8;  // ll_dispatch_kernel<IdxT, true>: the call quantizes (no stages)
  LlDispatchShape shape;
};

template <typename IdxT>
const void* ll_kernel(bool direct_fp8) {
  return direct_fp8 ? reinterpret_cast<const void*>(&ll_dispatch_kernel<IdxT, true>)
                    : reinterpret_cast<const void*>(&ll_dispatch_kernel<IdxT, false>);
}

template <typename IdxT>
cudaError_t configure_low_latency(const DispatchParams& p, LowLatencyConfig* out) {
  LowLatencyConfig cfg{};
  LlDispatchShape& shape = cfg.shape;
  KernelSmem info{};
  cfg.direct_fp8 = p.quantize_fp8;
  cudaError_t err = kernel_smem(ll_kernel<IdxT>(cfg.direct_fp8), &info);
  if (err != cudaSuccess) return err;
  // One unit per warp when num_sms allows: the latency of a call is one unit's work. A call
  // with fewer tokens than warps spreads each token's K stores over K warps, and each pair's
  // row over `parts` warps (chunks of about row / parts bytes), up to one unit per warp. When
  // the kernel quantizes, units are token chunks instead (each quantized once, stored K times).
  const int64_t total_warps = static_cast<int64_t>(p.num_sms) * kDispatchWarps;
  const int64_t num_pairs = static_cast<int64_t>(p.num_tokens) * p.num_topk;
  const bool small = is_small_call(p.num_tokens, total_warps);
  shape.use_tma = reinterpret_cast<uintptr_t>(p.x) % kBulkAlign == 0 &&
                  p.x_row_bytes % kBulkAlign == 0;
  if (p.quantize_fp8 && !shape.use_tma) return cudaErrorInvalidValue;  // the binding prevents it
  shape.one_slot = small && !p.quantize_fp8;
  int64_t parts_cap = kMaxDispatchStageBytes;  // chunk cap that spreads the units over the warps
  if (shape.use_tma && small && p.num_tokens > 0) {
    const int64_t wanted_parts =
        ceil_div(total_warps, shape.one_slot ? num_pairs : static_cast<int64_t>(p.num_tokens));
    // Round the piece up (to 16 bytes, or to whole 128-channel blocks when quantizing), so the
    // row makes at most wanted_parts chunks: never more units than warps.
    const int64_t grain =
        p.quantize_fp8 ? static_cast<int64_t>(kFp8Block) * dtype_bytes(p.x_dtype) : kBulkAlign;
    parts_cap = round_up(ceil_div(p.x_row_bytes, wanted_parts), grain);
    if (parts_cap < kMinDispatchChunkBytes) parts_cap = kMinDispatchChunkBytes;
  }
  // The stages get the shared memory the per-block arrays leave. Whole tokens: exact. Small
  // calls: bounded before the unit split is known (a block's pairs never exceed the call's).
  const int64_t token_blocks = clamp_blocks(ceil_div(p.num_tokens, kDispatchWarps), p.num_sms);
  const int64_t rows_cap_bound =
      small ? num_pairs + 2 * p.num_topk
            : max_pairs_of_units(ceil_div(p.num_tokens, token_blocks), 1, false, p.num_topk);
  const int64_t fixed_cap =
      round_up(ll_dispatch_smem_ints(p.comm.world_size, p.comm.num_experts, rows_cap_bound) * 4,
               kSmemAlign);
  cfg.smem = {true, fixed_cap, info.max_dynamic};
  shape.stage_bytes = 0;
  shape.parts = 1;
  shape.per_token = shape.one_slot ? p.num_topk : 1;
  if (shape.use_tma) {
    // The staged kernel's stages share the block's shared memory with the arrays; the
    // quantizing kernel keeps its chunks in registers, so only the cap bounds them.
    int64_t cap = kMaxDispatchStageBytes;
    if (!cfg.direct_fp8) {
      const int64_t budget = info.max_dynamic - fixed_cap;
      const int64_t fits = budget > 0 ? budget / (kDispatchWarps * kDispatchStages) : 0;
      if (fits < cap) cap = fits;
    }
    if (small && cap > parts_cap) cap = parts_cap;
    shape.stage_bytes = dispatch_chunk_bytes(p, cap);
    if (shape.stage_bytes == 0) {
      cfg.smem = {false, fixed_cap + 16 * kDispatchWarps * kDispatchStages, info.max_dynamic};
    } else if (small) {
      shape.parts = static_cast<int>(ceil_div(p.x_row_bytes, shape.stage_bytes));
      shape.per_token = (shape.one_slot ? p.num_topk : 1) * shape.parts;
    }
  }
  const int64_t units = static_cast<int64_t>(p.num_tokens) * shape.per_token;
  cfg.blocks = clamp_blocks(ceil_div(units, kDispatchWarps), p.num_sms);
  shape.units_per_block = ceil_div(units, cfg.blocks);
  shape.rows_cap =
      max_pairs_of_units(shape.units_per_block, shape.parts, shape.one_slot, p.num_topk);
  const int64_t fixed =
      round_up(ll_dispatch_smem_ints(p.comm.world_size, p.comm.num_experts, shape.rows_cap) * 4,
               kSmemAlign);
  const int64_t stages = cfg.direct_fp8 ? 0 : shape.stage_bytes * kDispatchWarps * kDispatchStages;
  cfg.smem_bytes = fixed + stages;
  if (fixed > fixed_cap || fixed > info.max_dynamic) cfg.smem = {false, fixed, info.max_dynamic};
  *out = cfg;
  return cudaSuccess;
}

template <typename IdxT>
LaunchResult launch(const DispatchParams& p, cudaStream_t stream) {
  if (p.comm.ll_rows_per_expert <= 0) return launch_result(cudaErrorInvalidValue);
  LowLatencyConfig cfg{};
  cudaError_t err = configure_low_latency<IdxT>(p, &cfg);
  if (err != cudaSuccess) return launch_result(err);
  if (!cfg.smem.ok) return smem_refused(cfg.smem);
  err = ensure_dynamic_smem(ll_kernel<IdxT>(cfg.direct_fp8), cfg.smem_bytes);
  if (err != cudaSuccess) return launch_result(err);
  const dim3 grid(static_cast<unsigned>(cfg.blocks));
  if (cfg.direct_fp8) {
    ll_dispatch_kernel<IdxT, true>
        <<<grid, kDispatchThreads, cfg.smem_bytes, stream>>>(p, cfg.shape);
  } else {
    ll_dispatch_kernel<IdxT, false>
        <<<grid, kDispatchThreads, cfg.smem_bytes, stream>>>(p, cfg.shape);
  }
  return launch_result(cudaGetLastError());
}

}  // namespace

LaunchResult launch_low_latency_dispatch(const DispatchParams& params, cudaStream_t stream) {
  return params.topk_idx_is_int64 ? launch<int64_t>(params, stream)
                                  : launch<int32_t>(params, stream);
}

}  // namespace swiftep
