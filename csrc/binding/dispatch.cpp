// CUDA implementations of swiftep::dispatch and swiftep::low_latency_dispatch (schemas:
// ops/dispatch.py, ops/low_latency_dispatch.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common.h"
#include "swiftep/launchers.h"
#include "swiftep/params.h"

namespace swiftep {
namespace binding {
namespace {

// x [num_tokens <= max_tokens, hidden] on the workspace's device, no wider per row than the
// windows; its scales when x is FP8, or, with quantize, a 16-byte aligned x of a dtype the
// kernel reads and quantizes to FP8 on the way out. The outputs are the caller's.
DispatchParams make_dispatch_params(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                                    const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                                    const CommParams& comm, int64_t max_tokens, bool quantize,
                                    const at::Device& device, const char* op) {
  check_cuda(x, op, "x", device);
  const auto dtype = x.scalar_type();
  const bool fp8 = dtype == at::kFloat8_e4m3fn;
  DType x_dtype = DType::kBFloat16;  // read only when quantizing
  SWIFTEP_CHECK(TYPE, fp8 || to_dtype(dtype, &x_dtype),
                "x must be bfloat16, float16, float32 or float8_e4m3fn, got ", dtype);
  SWIFTEP_CHECK(VALUE, x.dim() == 2 && x.size(1) == comm.hidden, "x must be [num_tokens, ",
                comm.hidden, "], got shape ", x.sizes());
  const int64_t num_tokens = x.size(0);
  SWIFTEP_CHECK(VALUE, num_tokens <= max_tokens, "x has ", num_tokens, " tokens, more than the ",
                max_tokens, " this communicator was built for");
  const int64_t x_row_bytes = x.element_size() * comm.hidden;
  SWIFTEP_CHECK(TYPE, x_row_bytes <= comm.row_bytes, "x has dtype ", dtype,
                ", wider than the communicator's windows (", comm.row_bytes, " bytes per row)");
  int64_t scale_cols = 0;
  const float* scales_ptr = nullptr;
  if (quantize) {
    SWIFTEP_CHECK(TYPE, !fp8, "quantize_fp8=True takes a bfloat16/float16/float32 x, got ",
                  dtype);
    SWIFTEP_CHECK(VALUE, reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
                  "quantize_fp8=True needs a 16-byte aligned x (got address ", x.data_ptr(),
                  "); pass x.clone()");
    scale_cols = comm.hidden / kFp8Block;
  } else if (fp8) {
    SWIFTEP_CHECK(VALUE, x_scales.has_value(),
                  "x is float8_e4m3fn: x_scales [num_tokens, hidden / 128] float32 is required");
    const at::Tensor& s = *x_scales;
    check_cuda(s, op, "x_scales", device);
    scale_cols = comm.hidden / kFp8Block;
    SWIFTEP_CHECK(TYPE, s.scalar_type() == at::kFloat, "x_scales must be float32, got ",
                  s.scalar_type());
    SWIFTEP_CHECK(VALUE, s.dim() == 2 && s.size(0) == num_tokens && s.size(1) == scale_cols,
                  "x_scales must be [", num_tokens, ", ", scale_cols, "], got shape ", s.sizes());
    scales_ptr = s.data_ptr<float>();
  }
  const int64_t k = check_routing(topk_idx, topk_weights, num_tokens, comm, device, op);
  DispatchParams p{};
  p.comm = comm;
  p.x = x.data_ptr();
  p.x_scales = scales_ptr;
  p.topk_idx = topk_idx.data_ptr();
  p.topk_idx_is_int64 = topk_idx.scalar_type() == at::kLong;
  p.topk_weights = topk_weights.data_ptr<float>();
  p.num_tokens = static_cast<int32_t>(num_tokens);
  p.num_topk = static_cast<int32_t>(k);
  p.x_row_bytes = x_row_bytes;
  p.quantize_fp8 = quantize;
  p.x_dtype = x_dtype;
  p.out_row_bytes = quantize ? comm.hidden : x_row_bytes;
  p.scale_cols = static_cast<int32_t>(scale_cols);
  return p;
}

std::tuple<at::Tensor, at::Tensor> dispatch_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& x_scales, const at::Tensor& topk_idx,
    const at::Tensor& topk_weights, const at::Tensor& workspace, const at::Tensor& peer_ptrs,
    c10::string_view group_name, at::IntArrayRef plan, int64_t num_sms, bool quantize_fp8) {
  const char* op = "dispatch";
  c10::cuda::CUDAGuard guard(workspace.device());
  const CommParams comm = check_comm(workspace, peer_ptrs, plan, op);
  DispatchParams p = make_dispatch_params(x, x_scales, topk_idx, topk_weights, comm,
                                          comm.max_tokens_per_rank, quantize_fp8,
                                          workspace.device(), op);
  const auto int_opts = x.options().dtype(at::kInt);
  at::Tensor expert_offsets = at::empty({comm.num_local_experts + 1}, int_opts);
  at::Tensor token_rows = at::empty({p.num_tokens, p.num_topk}, int_opts);
  p.expert_offsets = expert_offsets.data_ptr<int32_t>();
  p.token_rows = token_rows.data_ptr<int32_t>();
  p.num_sms = static_cast<int32_t>(num_sms);
  check_launch(launch_dispatch(p, c10::cuda::getCurrentCUDAStream()), op, &comm);
  return {expert_offsets, token_rows};
}

std::tuple<at::Tensor, at::Tensor> low_latency_dispatch_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& x_scales, const at::Tensor& topk_idx,
    const at::Tensor& topk_weights, const at::Tensor& workspace, const at::Tensor& peer_ptrs,
    c10::string_view group_name, at::IntArrayRef plan, int64_t num_sms, bool quantize_fp8) {
  const char* op = "low_latency_dispatch";
  c10::cuda::CUDAGuard guard(workspace.device());
  const CommParams comm = check_comm(workspace, peer_ptrs, plan, op);
  SWIFTEP_CHECK(VALUE, comm.ll_max_tokens_per_rank > 0,
                "the plan has no low-latency windows (ll_max_tokens_per_rank=0)");
  DispatchParams p = make_dispatch_params(x, x_scales, topk_idx, topk_weights, comm,
                                          comm.ll_max_tokens_per_rank, quantize_fp8,
                                          workspace.device(), op);
  const auto int_opts = x.options().dtype(at::kInt);
  at::Tensor recv_counts = at::empty({comm.num_local_experts}, int_opts);
  at::Tensor token_rows = at::empty({p.num_tokens, p.num_topk}, int_opts);
  p.recv_counts = recv_counts.data_ptr<int32_t>();
  p.token_rows = token_rows.data_ptr<int32_t>();
  p.num_sms = static_cast<int32_t>(num_sms);
  check_launch(launch_low_latency_dispatch(p, c10::cuda::getCurrentCUDAStream()), op, &comm);
  return {recv_counts, token_rows};
}

}  // namespace
}  // namespace binding
}  // namespace swiftep

TORCH_LIBRARY_IMPL(swiftep, CUDA, m) {
  m.impl("dispatch", &swiftep::binding::dispatch_cuda);
  m.impl("low_latency_dispatch", &swiftep::binding::low_latency_dispatch_cuda);
}
