// CUDA implementations of swiftep::combine, swiftep::low_latency_combine and
// swiftep::combine_symmetric (schemas: ops/combine.py, ops/low_latency_combine.py,
// ops/combine_symmetric.py): one kernel over either path's combine window, after the staging
// copy when expert_out is not that window; combine_symmetric reads every rank's expert_out in
// place (no staging copy); with combine_partials the throughput combine reads expert_out in
// place on its own rank and pushes partials (ops/combine/partials_kernel.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>

#include "common.h"
#include "swiftep/launchers.h"
#include "swiftep/params.h"

namespace swiftep {
namespace binding {
namespace {

// expert_out against the window: [capacity or more, hidden] (throughput) or [L, S, hidden]
// (low latency), of a dtype the kernel reads and no wider per row than the windows. Returns
// its dtype.
DType check_expert_out(const at::Tensor& expert_out, const CommParams& comm, bool low_latency,
                       const at::Device& device, const char* op) {
  check_cuda(expert_out, op, "expert_out", device);
  DType dtype = DType::kFloat32;
  SWIFTEP_CHECK(TYPE, to_dtype(expert_out.scalar_type(), &dtype),
                "expert_out must be bfloat16, float16 or float32, got ",
                expert_out.scalar_type());
  const int64_t hidden = comm.hidden;
  SWIFTEP_CHECK(VALUE, expert_out.dim() >= 1 && expert_out.size(-1) == hidden,
                "expert_out has shape ", expert_out.sizes(),
                ", the communicator was built for hidden=", hidden);
  if (low_latency) {
    SWIFTEP_CHECK(VALUE,
                  expert_out.dim() == 3 && expert_out.size(0) == comm.num_local_experts &&
                      expert_out.size(1) == comm.ll_rows_per_expert,
                  "expert_out must be [", comm.num_local_experts, ", ", comm.ll_rows_per_expert,
                  ", ", hidden, "], got shape ", expert_out.sizes());
  } else {
    SWIFTEP_CHECK(VALUE, expert_out.dim() == 2 && expert_out.size(0) >= comm.capacity,
                  "expert_out must be [capacity=", comm.capacity, " or more, ", hidden,
                  "], got shape ", expert_out.sizes());
  }
  SWIFTEP_CHECK(TYPE, expert_out.element_size() * hidden <= comm.row_bytes,
                "expert_out has dtype ", expert_out.scalar_type(),
                ", wider than the communicator's windows");
  return dtype;
}

// Every combine's checks (expert_out, routing, token_rows, counts) and its parameters; y is
// allocated here, into *y. counts: expert_offsets [L + 1] (throughput) or recv_counts [L] (low
// latency).
CombineParams prepare_combine(const at::Tensor& expert_out, const at::Tensor& topk_idx,
                              const at::Tensor& topk_weights, const at::Tensor& token_rows,
                              const at::Tensor& counts, const at::Tensor& workspace,
                              const at::Tensor& peer_ptrs, at::IntArrayRef plan, int64_t num_sms,
                              bool low_latency, const char* op, at::Tensor* y) {
  const CommParams comm = check_comm(workspace, peer_ptrs, plan, op);
  SWIFTEP_CHECK(VALUE, !low_latency || comm.ll_max_tokens_per_rank > 0,
                "the plan has no low-latency windows (ll_max_tokens_per_rank=0)");
  const at::Device device = workspace.device();
  const DType dtype = check_expert_out(expert_out, comm, low_latency, device, op);
  const int64_t num_tokens = topk_idx.dim() == 2 ? topk_idx.size(0) : -1;
  const int64_t k = check_routing(topk_idx, topk_weights, num_tokens, comm, device, op);
  check_cuda(token_rows, op, "token_rows", device);
  SWIFTEP_CHECK(TYPE, token_rows.scalar_type() == at::kInt, "token_rows must be int32, got ",
                token_rows.scalar_type());
  SWIFTEP_CHECK(VALUE, token_rows.sizes() == topk_idx.sizes(),
                "token_rows must have topk_idx's shape ", topk_idx.sizes(), ", got ",
                token_rows.sizes(), " (pass the handle of the matching dispatch)");
  const int64_t num_local = comm.num_local_experts;
  const char* counts_name = low_latency ? "recv_counts" : "expert_offsets";
  const int64_t counts_len = low_latency ? num_local : num_local + 1;
  check_cuda(counts, op, counts_name, device);
  SWIFTEP_CHECK(TYPE, counts.scalar_type() == at::kInt, counts_name, " must be int32, got ",
                counts.scalar_type());
  SWIFTEP_CHECK(VALUE, counts.dim() == 1 && counts.numel() == counts_len, counts_name,
                " must be [", counts_len, "], got shape ", counts.sizes());

  *y = at::empty({num_tokens, comm.hidden}, expert_out.options());
  CombineParams p{};
  p.comm = comm;
  p.topk_idx = topk_idx.data_ptr();
  p.topk_idx_is_int64 = topk_idx.scalar_type() == at::kLong;
  p.topk_weights = topk_weights.data_ptr<float>();
  p.token_rows = token_rows.data_ptr<int32_t>();
  p.num_tokens = static_cast<int32_t>(num_tokens);
  p.num_topk = static_cast<int32_t>(k);
  p.hidden = comm.hidden;
  p.dtype = dtype;
  p.out_row_bytes = expert_out.element_size() * comm.hidden;
  p.y = y->data_ptr();
  p.num_sms = static_cast<int32_t>(num_sms);
  return p;
}

// expert_out's valid rows copied into this rank's combine window (one local copy), unless
// expert_out is the window already.
void stage_into_window(const at::Tensor& expert_out, const CombineParams& p,
                       const at::Tensor& counts, bool low_latency, cudaStream_t stream,
                       const char* op) {
  const CommParams& comm = p.comm;
  uint8_t* window =
      comm.workspace + (low_latency ? comm.off_ll_combine_x : comm.off_combine_x);
  if (expert_out.data_ptr() == static_cast<void*>(window)) return;
  CopyRowsParams copy{};
  copy.dst = window;
  copy.src = static_cast<const uint8_t*>(expert_out.data_ptr());
  copy.row_bytes = p.out_row_bytes;
  copy.group_rows = low_latency ? comm.ll_rows_per_expert : comm.capacity;
  copy.num_groups = low_latency ? comm.num_local_experts : 1;
  // Throughput: the valid rows are [0, expert_offsets[L]); low latency: [0, recv_counts[j]).
  copy.counts = counts.data_ptr<int32_t>() + (low_latency ? 0 : comm.num_local_experts);
  copy.num_sms = p.num_sms;
  check_launch(launch_copy_rows(copy, stream), op);
}

// Both combines: checks, the staging copy when expert_out is not the combine window, y.
at::Tensor run_combine(const at::Tensor& expert_out, const at::Tensor& topk_idx,
                       const at::Tensor& topk_weights, const at::Tensor& token_rows,
                       const at::Tensor& counts, const at::Tensor& workspace,
                       const at::Tensor& peer_ptrs, at::IntArrayRef plan, int64_t num_sms,
                       bool low_latency, const char* op) {
  at::Tensor y;
  const CombineParams p = prepare_combine(expert_out, topk_idx, topk_weights, token_rows, counts,
                                          workspace, peer_ptrs, plan, num_sms, low_latency, op,
                                          &y);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (!low_latency && p.comm.combine_partials != 0) {  // expert_out read in place, no staging
    SWIFTEP_CHECK(VALUE, p.out_row_bytes % 16 == 0 &&
                             reinterpret_cast<uintptr_t>(expert_out.data_ptr()) % 16 == 0,
                  "combine_partials reads expert_out in 16-byte vectors: its rows must be a "
                  "multiple of 16 bytes and it must be 16-byte aligned, got rows of ",
                  p.out_row_bytes, " bytes (hidden=", p.hidden, ", ", expert_out.scalar_type(),
                  ") at address ", expert_out.data_ptr());
    check_launch(launch_combine_partials(p, expert_out.data_ptr(), stream), op, &p.comm);
    return y;
  }
  stage_into_window(expert_out, p, counts, low_latency, stream, op);
  check_launch(low_latency ? launch_low_latency_combine(p, stream) : launch_combine(p, stream), op,
               &p.comm);
  return y;
}

at::Tensor combine_cuda(const at::Tensor& expert_out, const at::Tensor& topk_idx,
                        const at::Tensor& topk_weights, const at::Tensor& token_rows,
                        const at::Tensor& expert_offsets, const at::Tensor& workspace,
                        const at::Tensor& peer_ptrs, c10::string_view group_name,
                        at::IntArrayRef plan, int64_t num_sms) {
  c10::cuda::CUDAGuard guard(workspace.device());
  return run_combine(expert_out, topk_idx, topk_weights, token_rows, expert_offsets, workspace,
                     peer_ptrs, plan, num_sms, /*low_latency=*/false, "combine");
}

at::Tensor low_latency_combine_cuda(const at::Tensor& expert_out, const at::Tensor& topk_idx,
                                    const at::Tensor& topk_weights, const at::Tensor& token_rows,
                                    const at::Tensor& recv_counts, const at::Tensor& workspace,
                                    const at::Tensor& peer_ptrs, c10::string_view group_name,
                                    at::IntArrayRef plan, int64_t num_sms) {
  c10::cuda::CUDAGuard guard(workspace.device());
  return run_combine(expert_out, topk_idx, topk_weights, token_rows, recv_counts, workspace,
                     peer_ptrs, plan, num_sms, /*low_latency=*/true, "low_latency_combine");
}

// The throughput combine reading every owner's expert_out in place (torch's symmetric memory
// pool): segment_bases [segments, world_size] int64 holds every rendezvoused segment's row 0 of
// each rank as mapped here; this rank's expert_out starts segment_offset bytes into its
// segment `segment`. No staging copy; the kernel reads 16-byte vectors, so expert_out's rows and
// address must be 16-byte aligned. segment -1: expert_out is in no segment the peers know, so
// it is staged into this rank's combine window and the peers read it there.
at::Tensor combine_symmetric_cuda(const at::Tensor& expert_out, const at::Tensor& segment_bases,
                                  int64_t segment, int64_t segment_offset,
                                  const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                                  const at::Tensor& token_rows, const at::Tensor& expert_offsets,
                                  const at::Tensor& workspace, const at::Tensor& peer_ptrs,
                                  c10::string_view group_name, at::IntArrayRef plan,
                                  int64_t num_sms) {
  c10::cuda::CUDAGuard guard(workspace.device());
  const char* op = "combine_symmetric";
  check_cuda(segment_bases, op, "segment_bases", workspace.device());
  SWIFTEP_CHECK(TYPE, segment_bases.scalar_type() == at::kLong,
                "segment_bases must be int64, got ", segment_bases.scalar_type());
  SWIFTEP_CHECK(VALUE, segment_bases.dim() == 2 && segment_bases.is_contiguous(),
                "segment_bases must be a contiguous [segments, world_size], got shape ",
                segment_bases.sizes());
  const bool known = segment >= 0 && segment < segment_bases.size(0);
  SWIFTEP_CHECK(VALUE, segment == kStagedSegment || known,
                "segment must be ", kStagedSegment, " or in [0, ", segment_bases.size(0), "), got ",
                segment);
  SWIFTEP_CHECK(VALUE, segment_offset >= 0 && segment_offset % 16 == 0,
                "segment_offset must be a non-negative multiple of 16, got ", segment_offset);
  at::Tensor y;
  const CombineParams p = prepare_combine(expert_out, topk_idx, topk_weights, token_rows,
                                          expert_offsets, workspace, peer_ptrs, plan, num_sms,
                                          /*low_latency=*/false, op, &y);
  const int64_t world = p.comm.world_size;
  SWIFTEP_CHECK(VALUE, segment_bases.size(1) == world, "segment_bases must be [segments, "
                "world_size=", world, "], got shape ", segment_bases.sizes());
  SWIFTEP_CHECK(VALUE, world <= kMaxTableRanks, "combine_symmetric serves at most ",
                kMaxTableRanks, " ranks, got world_size=", world);
  SWIFTEP_CHECK(VALUE, p.out_row_bytes % 16 == 0,
                "expert_out's rows must be a multiple of 16 bytes (the kernel reads 16-byte "
                "vectors), got ", p.out_row_bytes, " bytes (hidden=", p.hidden, ", ",
                expert_out.scalar_type(), ")");
  SWIFTEP_CHECK(VALUE, reinterpret_cast<uintptr_t>(expert_out.data_ptr()) % 16 == 0,
                "expert_out must be 16-byte aligned (the kernel reads 16-byte vectors), got "
                "address ", expert_out.data_ptr());
  const SegmentTable table{segment_bases.data_ptr<int64_t>(), segment_bases.size(0), segment,
                           segment_offset};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (segment == kStagedSegment) {
    stage_into_window(expert_out, p, expert_offsets, /*low_latency=*/false, stream, op);
  }
  check_launch(launch_combine_from_table(p, table, stream), op, &p.comm);
  return y;
}

}  // namespace
}  // namespace binding
}  // namespace swiftep

TORCH_LIBRARY_IMPL(swiftep, CUDA, m) {
  m.impl("combine", &swiftep::binding::combine_cuda);
  m.impl("low_latency_combine", &swiftep::binding::low_latency_combine_cuda);
  m.impl("combine_symmetric", &swiftep::binding::combine_symmetric_cuda);
}
