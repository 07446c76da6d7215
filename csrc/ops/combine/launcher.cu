// Launchers of both combines and of the staging copy (copy_rows.cuh). The throughput window
// takes the register-load combine (kernel_ldg.cuh) when its rows are 16-byte aligned; the
// low-latency window, and unaligned rows, take the staged combine (kernel.cuh). The combine from
// a table of the owners' rows (launch_combine_from_table) is the register-load combine in any
// build (-DSWIFTEP_COMBINE_LDG=0 included), and needs aligned rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "ops/combine/copy_rows.cuh"
#include "ops/combine/kernel.cuh"
#include "ops/combine/kernel_ldg.cuh"
#include "ops/combine/partials_kernel.cuh"
#include "ops/launch_utils.h"
#include "swiftep/launchers.h"

namespace swiftep {

namespace {

// The launch configuration of one combine call.
struct CombineConfig {
  SmemCheck smem;
  CombineShape shape;
  int64_t smem_bytes;
  int64_t blocks;
};

// Rows of the window and of y start on 16-byte boundaries: the vector and bulk-copy paths.
bool rows_aligned(const CombineParams& p) {
  return p.out_row_bytes % kBulkAlign == 0 && reinterpret_cast<uintptr_t>(p.y) % kBulkAlign == 0;
}

template <typename T, typename IdxT>
cudaError_t configure_combine(const CombineParams& p, CombineConfig* out) {
  CombineConfig cfg{};
  KernelSmem info{};
  cudaError_t err = kernel_smem(reinterpret_cast<const void*>(&combine_kernel<T, IdxT>), &info);
  if (err != cudaSuccess) return err;
  cfg.smem = {true, 0, info.max_dynamic};
  cfg.shape.use_tma = rows_aligned(p);
  int64_t chunks = 1;
  if (cfg.shape.use_tma) {
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
    cfg.shape.chunk_bytes = even_chunk_bytes(p.out_row_bytes, cap);
    cfg.smem_bytes = static_cast<int64_t>(kCombineWarps) * kCombineStages * p.num_topk *
                     cfg.shape.chunk_bytes;
    if (cfg.shape.chunk_bytes == 0) {
      cfg.smem = {false, static_cast<int64_t>(kCombineWarps) * kCombineStages * p.num_topk * 16,
                  info.max_dynamic};
    } else {
      chunks = ceil_div(p.out_row_bytes, cfg.shape.chunk_bytes);
    }
  }
  cfg.blocks = clamp_blocks(ceil_div(static_cast<int64_t>(p.num_tokens) * chunks, kCombineWarps),
                            p.num_sms);
  *out = cfg;
  return cudaSuccess;
}

// The register-load combine (kernel_ldg.cuh; rows_aligned(p) checked by the caller): rows from
// the owners' windows (table.bases nullptr) or from the segment table (kFromTable).
template <typename T, typename IdxT, bool kFromTable>
LaunchResult launch_ldg(const CombineParams& p, const CombineWindow& win,
                        const SegmentTable& table, cudaStream_t stream) {
  const int64_t blocks = clamp_blocks(ceil_div(p.num_tokens, kLdgWarps), p.num_sms);
  combine_ldg_kernel<T, IdxT, kFromTable>
      <<<static_cast<unsigned>(blocks), kLdgThreads, 0, stream>>>(p, win, table);
  return launch_result(cudaGetLastError());
}

// table.bases: nullptr (the windows' rows), else launch_combine_from_table's table.
template <typename T, typename IdxT>
LaunchResult launch_typed(const CombineParams& p, const CombineWindow& win,
                          const SegmentTable& table, cudaStream_t stream) {
  if (table.bases != nullptr) return launch_ldg<T, IdxT, true>(p, win, table, stream);
  if constexpr (kCombineLdg) {  // the throughput window's register-load combine (kernel_ldg.cuh)
    if (win.epoch_slot == kEpochThroughput && rows_aligned(p)) {
      return launch_ldg<T, IdxT, false>(p, win, table, stream);
    }
  }
  CombineConfig cfg{};
  cudaError_t err = configure_combine<T, IdxT>(p, &cfg);
  if (err != cudaSuccess) return launch_result(err);
  if (!cfg.smem.ok) return smem_refused(cfg.smem);
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(&combine_kernel<T, IdxT>),
                            cfg.smem_bytes);
  if (err != cudaSuccess) return launch_result(err);
  combine_kernel<T, IdxT><<<static_cast<unsigned>(cfg.blocks), kCombineThreads, cfg.smem_bytes,
                            stream>>>(p, win, cfg.shape.chunk_bytes, cfg.shape.use_tma);
  return launch_result(cudaGetLastError());
}

template <typename IdxT>
LaunchResult launch_by_dtype(const CombineParams& p, const CombineWindow& win,
                             const SegmentTable& table, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kBFloat16: return launch_typed<__nv_bfloat16, IdxT>(p, win, table, stream);
    case DType::kFloat16: return launch_typed<__half, IdxT>(p, win, table, stream);
    case DType::kFloat32: return launch_typed<float, IdxT>(p, win, table, stream);
  }
  return launch_result(cudaErrorInvalidValue);
}

// combine_partials: the push on every owner (always launched: the peers wait for its flags),
// then the reduce of this rank's tokens.
template <typename T, typename IdxT>
LaunchResult launch_partials_typed(const CombineParams& p, const uint8_t* rows,
                                   cudaStream_t stream) {
  const CommParams& c = p.comm;
  const int64_t pair_blocks =
      ceil_div(static_cast<int64_t>(c.world_size) * c.max_tokens_per_rank, kWarpSize);
  combine_push_kernel<T><<<static_cast<unsigned>(clamp_blocks(ceil_div(pair_blocks, kLdgWarps),
                                                              p.num_sms)),
                           kLdgThreads, 0, stream>>>(p, rows);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return launch_result(err);
  combine_partials_reduce_kernel<T, IdxT>
      <<<static_cast<unsigned>(clamp_blocks(ceil_div(p.num_tokens, kLdgWarps), p.num_sms)),
         kLdgThreads, 0, stream>>>(p);
  return launch_result(cudaGetLastError());
}

template <typename IdxT>
LaunchResult launch_partials_by_dtype(const CombineParams& p, const uint8_t* rows,
                                      cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kBFloat16: return launch_partials_typed<__nv_bfloat16, IdxT>(p, rows, stream);
    case DType::kFloat16: return launch_partials_typed<__half, IdxT>(p, rows, stream);
    case DType::kFloat32: return launch_partials_typed<float, IdxT>(p, rows, stream);
  }
  return launch_result(cudaErrorInvalidValue);
}

LaunchResult launch_window(const CombineParams& p, const CombineWindow& win,
                           const SegmentTable& table, cudaStream_t stream) {
  return p.topk_idx_is_int64 ? launch_by_dtype<int64_t>(p, win, table, stream)
                             : launch_by_dtype<int32_t>(p, win, table, stream);
}

// The throughput path's window: its flags and epoch serve both of its sources of rows.
CombineWindow throughput_window(const CommParams& c) {
  return CombineWindow{c.off_combine_x, c.off_combine_flags, kEpochThroughput, kWaitCombine,
                       c.capacity};
}

}  // namespace

LaunchResult launch_combine(const CombineParams& params, cudaStream_t stream) {
  return launch_window(params, throughput_window(params.comm), SegmentTable{}, stream);
}

LaunchResult launch_combine_from_table(const CombineParams& params, const SegmentTable& table,
                                       cudaStream_t stream) {
  if (table.bases == nullptr || params.comm.world_size > kMaxTableRanks ||
      !rows_aligned(params)) {
    return launch_result(cudaErrorInvalidValue);  // the binding checks first: the backstop
  }
  return launch_window(params, throughput_window(params.comm), table, stream);
}

LaunchResult launch_combine_partials(const CombineParams& params, const void* expert_out,
                                     cudaStream_t stream) {
  const auto* rows = static_cast<const uint8_t*>(expert_out);
  if (!rows_aligned(params) || reinterpret_cast<uintptr_t>(rows) % kBulkAlign != 0) {
    return launch_result(cudaErrorInvalidValue);  // the binding checks first: the backstop
  }
  return params.topk_idx_is_int64 ? launch_partials_by_dtype<int64_t>(params, rows, stream)
                                  : launch_partials_by_dtype<int32_t>(params, rows, stream);
}

LaunchResult launch_low_latency_combine(const CombineParams& params, cudaStream_t stream) {
  const CommParams& c = params.comm;
  const CombineWindow win{c.off_ll_combine_x, c.off_ll_combine_flags, kEpochLowLatency,
                          kWaitLlCombine, c.ll_rows_per_expert * c.num_local_experts};
  return launch_window(params, win, SegmentTable{}, stream);
}

LaunchResult launch_copy_rows(const CopyRowsParams& params, cudaStream_t stream) {
  if (params.num_groups <= 0) return launch_result(cudaSuccess);
  const int64_t blocks = clamp_blocks(params.num_sms, params.num_sms);
  const bool aligned = params.row_bytes % kBulkAlign == 0 &&
                       reinterpret_cast<uintptr_t>(params.src) % kBulkAlign == 0 &&
                       reinterpret_cast<uintptr_t>(params.dst) % kBulkAlign == 0;
  if (aligned) {  // bulk copies: ~2.5x the bytes per SM (copy_rows.cuh)
    const int64_t smem = kCopyStages * kCopyChunkBytes;
    const cudaError_t err =
        ensure_dynamic_smem(reinterpret_cast<const void*>(&copy_rows_tma_kernel), smem);
    if (err != cudaSuccess) return launch_result(err);
    copy_rows_tma_kernel<<<static_cast<unsigned>(blocks), kCopyTmaThreads, smem, stream>>>(
        params);
  } else {
    copy_rows_kernel<<<static_cast<unsigned>(blocks), kCopyThreads, 0, stream>>>(params);
  }
  return launch_result(cudaGetLastError());
}

}  // namespace swiftep
