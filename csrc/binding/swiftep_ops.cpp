// The one torch-aware C++ file: CUDA implementations of the swiftep ops (schemas in ops/*.py).
// Checks every argument (device, dtype, contiguity, shape, plan), allocates the small outputs
// and calls the launchers (csrc/launchers, no torch) on the current CUDA stream.
//
// Importing torch_swiftep._C runs the TORCH_LIBRARY_IMPL registration below; the module itself
// is empty (PyInit__C at the end).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>

#include "swiftep/launchers.h"
#include "swiftep/params.h"
#include "swiftep/plan_decode.h"
#include "swiftep/plan_fields.h"

namespace swiftep {
namespace {

// The kernels give one lane of a warp to each top-k slot.
constexpr int64_t kMaxTopkSlots = 32;

void check_cuda(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "swiftep::", op, ": ", name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.device() == device, "swiftep::", op, ": ", name, " is on ", t.device(),
              " but the workspace is on ", device);
  TORCH_CHECK(t.is_contiguous(), "swiftep::", op, ": ", name,
              " must be contiguous (got strides ", t.strides(), " for shape ", t.sizes(), ")");
}

// The decoded communicator state of one call, plus the plan values the checks need.
struct Comm {
  CommParams params;
  int64_t hidden;
  int64_t row_bytes;  // window pitch of the configured dtype
  int64_t plan_topk;
  int64_t max_tokens;
  int64_t ll_max_tokens;
  int32_t num_sms;
};

Comm check_comm(const at::Tensor& workspace, const at::Tensor& peer_ptrs, at::IntArrayRef plan,
                int64_t num_sms, const char* op) {
  TORCH_CHECK(static_cast<int64_t>(plan.size()) == kPlanNumFields, "swiftep::", op, ": plan has ",
              plan.size(), " fields, this build of torch_swiftep._C expects ", kPlanNumFields,
              " (pass torch_swiftep.plan.Plan.as_list(); rebuild the extension if plan.py changed)");
  check_cuda(workspace, op, "workspace", workspace.device());
  TORCH_CHECK(workspace.scalar_type() == at::kByte && workspace.dim() == 1, "swiftep::", op,
              ": workspace must be a 1-D uint8 tensor, got ", workspace.scalar_type(), " of shape ",
              workspace.sizes());
  TORCH_CHECK(workspace.numel() == plan[kPlan_workspace_bytes], "swiftep::", op,
              ": workspace has ", workspace.numel(), " bytes, the plan says workspace_bytes=",
              plan[kPlan_workspace_bytes]);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(workspace.data_ptr()) % 16 == 0, "swiftep::", op,
              ": workspace must be 16-byte aligned (bulk copies), got address ",
              workspace.data_ptr());
  const int64_t world = plan[kPlan_world_size];
  const int64_t experts = plan[kPlan_num_experts];
  TORCH_CHECK(world > 0 && experts > 0 && experts % world == 0, "swiftep::", op,
              ": plan has world_size=", world, ", num_experts=", experts,
              " (need num_experts % world_size == 0)");
  TORCH_CHECK(plan[kPlan_rank] >= 0 && plan[kPlan_rank] < world, "swiftep::", op,
              ": plan has rank=", plan[kPlan_rank], " outside [0, world_size=", world, ")");
  check_cuda(peer_ptrs, op, "peer_ptrs", workspace.device());
  TORCH_CHECK(peer_ptrs.scalar_type() == at::kLong && peer_ptrs.dim() == 1 &&
                  peer_ptrs.numel() == world,
              "swiftep::", op, ": peer_ptrs must be int64 [world_size=", world, "], got ",
              peer_ptrs.scalar_type(), " of shape ", peer_ptrs.sizes());
  TORCH_CHECK(num_sms > 0 && num_sms <= INT_MAX, "swiftep::", op,
              ": num_sms must be a positive int, got ", num_sms);
  TORCH_CHECK(plan[kPlan_hidden] > 0 && plan[kPlan_timeout_ms] > 0, "swiftep::", op,
              ": plan has hidden=", plan[kPlan_hidden], ", timeout_ms=", plan[kPlan_timeout_ms]);
  Comm comm{};
  comm.params = decode_plan(plan.data(), static_cast<uint8_t*>(workspace.data_ptr()),
                            peer_ptrs.data_ptr<int64_t>());
  comm.hidden = plan[kPlan_hidden];
  comm.row_bytes = plan[kPlan_row_bytes];
  comm.plan_topk = plan[kPlan_num_topk];
  comm.max_tokens = plan[kPlan_max_tokens_per_rank];
  comm.ll_max_tokens = plan[kPlan_ll_max_tokens_per_rank];
  comm.num_sms = static_cast<int32_t>(num_sms);
  return comm;
}

// topk_idx [N, K] int64/int32 and topk_weights [N, K] float32.
int64_t check_routing(const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                      int64_t num_tokens, const Comm& comm, const at::Device& device,
                      const char* op) {
  check_cuda(topk_idx, op, "topk_idx", device);
  check_cuda(topk_weights, op, "topk_weights", device);
  TORCH_CHECK(topk_idx.dim() == 2, "swiftep::", op, ": topk_idx must be 2-D, got shape ",
              topk_idx.sizes());
  TORCH_CHECK(topk_idx.scalar_type() == at::kLong || topk_idx.scalar_type() == at::kInt,
              "swiftep::", op, ": topk_idx must be int64 or int32, got ", topk_idx.scalar_type());
  TORCH_CHECK(topk_idx.size(0) == num_tokens, "swiftep::", op, ": topk_idx has ",
              topk_idx.size(0), " tokens, expected ", num_tokens);
  const int64_t k = topk_idx.size(1);
  TORCH_CHECK(k >= 1 && k <= comm.plan_topk && k <= kMaxTopkSlots, "swiftep::", op,
              ": topk_idx has num_topk=", k, "; it must be in [1, ", comm.plan_topk,
              "] (the communicator's num_topk) and at most ", kMaxTopkSlots,
              " (CUDA kernels: one lane per slot)");
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat, "swiftep::", op,
              ": topk_weights must be float32, got ", topk_weights.scalar_type());
  TORCH_CHECK(topk_weights.sizes() == topk_idx.sizes(), "swiftep::", op,
              ": topk_weights.shape=", topk_weights.sizes(), " must equal topk_idx.shape=",
              topk_idx.sizes());
  TORCH_CHECK(num_tokens <= INT_MAX / k, "swiftep::", op, ": too many tokens: ", num_tokens);
  return k;
}

DType combine_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kFloat: return DType::kFloat32;
    default:
      TORCH_CHECK(false, "swiftep::", op, ": expert_out must be bfloat16, float16 or float32, got ",
                  t.scalar_type());
  }
  return DType::kFloat32;
}

// quantize: the kernel quantizes x (bf16/fp16/fp32) to FP8 on the way out; x must then be
// 16-byte aligned for the bulk loads (x_aligned: x, or an aligned copy the caller keeps alive).
DispatchParams make_dispatch_params(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                                    const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                                    const Comm& comm, int64_t max_tokens, bool quantize,
                                    const char* op) {
  const at::Device device = x.device();
  check_cuda(x, op, "x", device);
  const auto dtype = x.scalar_type();
  const bool fp8 = dtype == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
              "swiftep::", op, ": x must be bfloat16, float16, float32 or float8_e4m3fn, got ",
              dtype);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == comm.hidden, "swiftep::", op, ": x must be [num_tokens, ",
              comm.hidden, "], got shape ", x.sizes());
  const int64_t num_tokens = x.size(0);
  TORCH_CHECK(num_tokens <= max_tokens, "swiftep::", op, ": x has ", num_tokens,
              " tokens, more than the ", max_tokens, " this communicator was built for");
  TORCH_CHECK(x.element_size() * comm.hidden <= comm.row_bytes, "swiftep::", op, ": x has dtype ",
              dtype, ", wider than the communicator's windows (", comm.row_bytes / comm.hidden,
              " bytes per element)");
  int64_t scale_cols = 0;
  const float* scales_ptr = nullptr;
  if (quantize) {
    TORCH_CHECK(!fp8 && !x_scales.has_value(), "swiftep::", op, ": quantize_fp8=True takes a "
                "bfloat16/float16/float32 x and no x_scales, got x of dtype ", dtype,
                x_scales.has_value() ? " and x_scales" : "");
    TORCH_CHECK(comm.hidden % kFp8Block == 0, "swiftep::", op, ": quantize_fp8=True needs hidden % ",
                kFp8Block, " == 0, got hidden=", comm.hidden);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "swiftep::", op,
                ": quantize_fp8=True needs a 16-byte aligned x (got address ", x.data_ptr(),
                "); pass x.clone()");
    scale_cols = comm.hidden / kFp8Block;
  } else if (fp8) {
    TORCH_CHECK(x_scales.has_value(), "swiftep::", op,
                ": x is float8_e4m3fn: x_scales [num_tokens, hidden / 128] float32 is required");
    TORCH_CHECK(comm.hidden % kFp8Block == 0, "swiftep::", op, ": FP8 dispatch needs hidden % ",
                kFp8Block, " == 0, got hidden=", comm.hidden);
    const at::Tensor& s = *x_scales;
    check_cuda(s, op, "x_scales", device);
    scale_cols = comm.hidden / kFp8Block;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == num_tokens &&
                    s.size(1) == scale_cols,
                "swiftep::", op, ": x_scales must be float32 [", num_tokens, ", ", scale_cols,
                "], got ", s.scalar_type(), " of shape ", s.sizes());
    scales_ptr = s.data_ptr<float>();
  } else {
    TORCH_CHECK(!x_scales.has_value(), "swiftep::", op, ": x_scales is given but x has dtype ",
                dtype, "; scales go with a float8_e4m3fn x");
  }
  const int64_t k = check_routing(topk_idx, topk_weights, num_tokens, comm, device, op);
  DispatchParams p{};
  p.comm = comm.params;
  p.x = x.data_ptr();
  p.x_scales = scales_ptr;
  p.topk_idx = topk_idx.data_ptr();
  p.topk_idx_is_int64 = topk_idx.scalar_type() == at::kLong;
  p.topk_weights = topk_weights.data_ptr<float>();
  p.num_tokens = static_cast<int32_t>(num_tokens);
  p.num_topk = static_cast<int32_t>(k);
  p.x_row_bytes = x.element_size() * comm.hidden;
  p.quantize_fp8 = quantize;
  p.x_dtype = fp8 ? DType::kBFloat16 : combine_dtype(x, op);  // read only when quantizing
  p.out_row_bytes = quantize ? comm.hidden : p.x_row_bytes;
  p.scale_cols = static_cast<int32_t>(scale_cols);
  p.num_sms = comm.num_sms;
  return p;
}

void check_smem(const SmemCheck& check, const char* op, const Comm& comm) {
  TORCH_CHECK(check.ok, "swiftep::", op, ": the kernel needs ", check.needed_bytes,
              " bytes of shared memory per block, the device allows ", check.available_bytes,
              " (num_experts=", comm.params.num_experts, ", hidden=", comm.hidden,
              "); reduce num_experts / num_topk / tokens per call");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "swiftep::", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

// ------------------------------------------------------------------------------ the ops
std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_layout_cuda(const at::Tensor& topk_idx,
                                                                    int64_t num_experts,
                                                                    int64_t world_size) {
  const char* op = "dispatch_layout";
  const at::Device device = topk_idx.device();
  check_cuda(topk_idx, op, "topk_idx", device);
  TORCH_CHECK(topk_idx.dim() == 2, "swiftep::dispatch_layout: topk_idx must be 2-D, got shape ",
              topk_idx.sizes());
  TORCH_CHECK(topk_idx.scalar_type() == at::kLong || topk_idx.scalar_type() == at::kInt,
              "swiftep::dispatch_layout: topk_idx must be int64 or int32, got ",
              topk_idx.scalar_type());
  TORCH_CHECK(world_size > 0 && num_experts > 0 && num_experts % world_size == 0 &&
                  num_experts <= INT_MAX,
              "swiftep::dispatch_layout: need num_experts % world_size == 0, got num_experts=",
              num_experts, ", world_size=", world_size);
  TORCH_CHECK(topk_idx.numel() <= INT_MAX, "swiftep::dispatch_layout: too many entries: ",
              topk_idx.numel());
  // This op has no status word to report through, so it checks the values on the host (one
  // sync) rather than silently counting an out-of-range entry as "no expert"; skipped while a
  // CUDA graph is being captured, where a sync is not allowed. The CPU backend raises
  // IndexError for the same input; here it is a RuntimeError, thrown before the device guard
  // below exists: on the GPU machine (torch 2.11) an error thrown from this library while a
  // CUDAGuard was alive crashed the interpreter instead of reaching Python.
  if (topk_idx.numel() > 0 &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    int64_t lo = 0, hi = 0;
    {
      c10::cuda::CUDAGuard sync_guard(device);
      const auto [lowest, highest] = at::aminmax(topk_idx);
      lo = lowest.item<int64_t>();
      hi = highest.item<int64_t>();
    }
    TORCH_CHECK(lo >= -1 && hi < num_experts, "swiftep::dispatch_layout: topk_idx has ",
                "values in [", lo, ", ", hi, "]; entries must be -1 (no expert) or in ",
                "[0, num_experts=", num_experts, ")");
  }
  c10::cuda::CUDAGuard guard(device);
  const int64_t num_tokens = topk_idx.size(0);
  const auto int_opts = topk_idx.options().dtype(at::kInt);
  at::Tensor per_rank = at::zeros({world_size}, int_opts);
  at::Tensor per_expert = at::zeros({num_experts}, int_opts);
  at::Tensor in_rank = at::zeros({num_tokens, world_size}, topk_idx.options().dtype(at::kBool));
  LayoutParams p{};
  p.topk_idx = topk_idx.data_ptr();
  p.topk_idx_is_int64 = topk_idx.scalar_type() == at::kLong;
  p.num_tokens = static_cast<int32_t>(num_tokens);
  p.num_topk = static_cast<int32_t>(topk_idx.size(1));
  p.num_experts = static_cast<int32_t>(num_experts);
  p.world_size = static_cast<int32_t>(world_size);
  p.num_tokens_per_rank = per_rank.data_ptr<int32_t>();
  p.num_tokens_per_expert = per_expert.data_ptr<int32_t>();
  p.is_token_in_rank = in_rank.data_ptr<bool>();
  check_launch(launch_dispatch_layout(p, c10::cuda::getCurrentCUDAStream()), op);
  return {per_rank, per_expert, in_rank};
}

std::tuple<at::Tensor, at::Tensor> dispatch_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& x_scales, const at::Tensor& topk_idx,
    const at::Tensor& topk_weights, const at::Tensor& workspace, const at::Tensor& peer_ptrs,
    c10::string_view group_name, at::IntArrayRef plan, int64_t num_sms, bool quantize_fp8) {
  const char* op = "dispatch";
  c10::cuda::CUDAGuard guard(workspace.device());
  const Comm comm = check_comm(workspace, peer_ptrs, plan, num_sms, op);
  TORCH_CHECK(x.device() == workspace.device(), "swiftep::dispatch: x is on ", x.device(),
              " but the workspace is on ", workspace.device());
  DispatchParams p =
      make_dispatch_params(x, x_scales, topk_idx, topk_weights, comm, comm.max_tokens,
                           quantize_fp8, op);
  const auto int_opts = x.options().dtype(at::kInt);
  at::Tensor expert_offsets = at::empty({comm.params.num_local_experts + 1}, int_opts);
  at::Tensor token_rows = at::empty({p.num_tokens, p.num_topk}, int_opts);
  p.expert_offsets = expert_offsets.data_ptr<int32_t>();
  p.token_rows = token_rows.data_ptr<int32_t>();
  check_smem(dispatch_smem(p), op, comm);
  check_launch(launch_dispatch(p, c10::cuda::getCurrentCUDAStream()), op);
  return {expert_offsets, token_rows};
}

std::tuple<at::Tensor, at::Tensor> low_latency_dispatch_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& x_scales, const at::Tensor& topk_idx,
    const at::Tensor& topk_weights, const at::Tensor& workspace, const at::Tensor& peer_ptrs,
    c10::string_view group_name, at::IntArrayRef plan, int64_t num_sms, bool quantize_fp8) {
  const char* op = "low_latency_dispatch";
  c10::cuda::CUDAGuard guard(workspace.device());
  const Comm comm = check_comm(workspace, peer_ptrs, plan, num_sms, op);
  TORCH_CHECK(comm.ll_max_tokens > 0, "swiftep::low_latency_dispatch: the plan has no "
              "low-latency windows (ll_max_tokens_per_rank=0)");
  TORCH_CHECK(x.device() == workspace.device(), "swiftep::low_latency_dispatch: x is on ",
              x.device(), " but the workspace is on ", workspace.device());
  DispatchParams p =
      make_dispatch_params(x, x_scales, topk_idx, topk_weights, comm, comm.ll_max_tokens,
                           quantize_fp8, op);
  const auto int_opts = x.options().dtype(at::kInt);
  at::Tensor recv_counts = at::empty({comm.params.num_local_experts}, int_opts);
  at::Tensor token_rows = at::empty({p.num_tokens, p.num_topk}, int_opts);
  p.recv_counts = recv_counts.data_ptr<int32_t>();
  p.token_rows = token_rows.data_ptr<int32_t>();
  check_smem(low_latency_dispatch_smem(p), op, comm);
  check_launch(launch_low_latency_dispatch(p, c10::cuda::getCurrentCUDAStream()), op);
  return {recv_counts, token_rows};
}

// Shared part of both combines: checks, params, y, and the staging copy when expert_out is not
// the combine window. window_rows: rows of the window; groups/group_rows/counts: valid rows.
at::Tensor run_combine(const at::Tensor& expert_out, const at::Tensor& topk_idx,
                       const at::Tensor& topk_weights, const at::Tensor& token_rows,
                       const at::Tensor& counts, const Comm& comm, bool low_latency,
                       const char* op) {
  const at::Device device = expert_out.device();
  check_cuda(expert_out, op, "expert_out", device);
  const DType dtype = combine_dtype(expert_out, op);
  const int64_t hidden = comm.hidden;
  const int64_t num_local = comm.params.num_local_experts;
  const int64_t group_rows = low_latency ? comm.params.ll_rows_per_expert : comm.params.capacity;
  const int64_t num_groups = low_latency ? num_local : 1;
  const int64_t window_rows = group_rows * num_groups;
  TORCH_CHECK(expert_out.dim() >= 1 && expert_out.size(-1) == hidden, "swiftep::", op,
              ": expert_out has hidden=", expert_out.size(-1), " (shape ", expert_out.sizes(),
              "), the communicator was built for hidden=", hidden);
  if (low_latency) {
    TORCH_CHECK(expert_out.dim() == 3 && expert_out.size(0) == num_local &&
                    expert_out.size(1) == group_rows,
                "swiftep::", op, ": expert_out must be [", num_local, ", ", group_rows, ", ",
                hidden, "], got shape ", expert_out.sizes());
  } else {
    TORCH_CHECK(expert_out.dim() == 2 && expert_out.size(0) >= window_rows, "swiftep::", op,
                ": expert_out must be [capacity=", window_rows, " or more, ", hidden,
                "], got shape ", expert_out.sizes());
  }
  const int64_t out_row_bytes = expert_out.element_size() * hidden;
  TORCH_CHECK(out_row_bytes <= comm.row_bytes, "swiftep::", op, ": expert_out has dtype ",
              expert_out.scalar_type(), ", wider than the communicator's windows");
  const int64_t num_tokens = topk_idx.dim() == 2 ? topk_idx.size(0) : -1;
  const int64_t k = check_routing(topk_idx, topk_weights, num_tokens, comm, device, op);
  check_cuda(token_rows, op, "token_rows", device);
  TORCH_CHECK(token_rows.scalar_type() == at::kInt && token_rows.sizes() == topk_idx.sizes(),
              "swiftep::", op, ": token_rows must be int32 of topk_idx's shape ",
              topk_idx.sizes(), ", got ", token_rows.scalar_type(), " of shape ",
              token_rows.sizes(), " (pass the handle of the matching dispatch)");
  const char* counts_name = low_latency ? "recv_counts" : "expert_offsets";
  const int64_t counts_len = low_latency ? num_local : num_local + 1;
  check_cuda(counts, op, counts_name, device);
  TORCH_CHECK(counts.scalar_type() == at::kInt && counts.dim() == 1 && counts.numel() == counts_len,
              "swiftep::", op, ": ", counts_name, " must be int32 [", counts_len, "], got ",
              counts.scalar_type(), " of shape ", counts.sizes());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t window_offset = low_latency ? comm.params.off_ll_combine_x
                                            : comm.params.off_combine_x;
  uint8_t* window = comm.params.workspace + window_offset;
  if (expert_out.data_ptr() != static_cast<void*>(window)) {  // stage it: one local copy
    CopyRowsParams copy{};
    copy.dst = window;
    copy.src = static_cast<const uint8_t*>(expert_out.data_ptr());
    copy.row_bytes = out_row_bytes;
    copy.group_rows = group_rows;
    copy.num_groups = static_cast<int32_t>(num_groups);
    // Throughput: the valid rows are [0, expert_offsets[L]); low latency: [0, recv_counts[j]).
    copy.counts = counts.data_ptr<int32_t>() + (low_latency ? 0 : num_local);
    copy.num_sms = comm.num_sms;
    check_launch(launch_copy_rows(copy, stream), op);
  }

  at::Tensor y = at::empty({num_tokens, hidden}, expert_out.options());
  CombineParams p{};
  p.comm = comm.params;
  p.topk_idx = topk_idx.data_ptr();
  p.topk_idx_is_int64 = topk_idx.scalar_type() == at::kLong;
  p.topk_weights = topk_weights.data_ptr<float>();
  p.token_rows = token_rows.data_ptr<int32_t>();
  p.num_tokens = static_cast<int32_t>(num_tokens);
  p.num_topk = static_cast<int32_t>(k);
  p.hidden = static_cast<int32_t>(hidden);
  p.dtype = dtype;
  p.out_row_bytes = out_row_bytes;
  p.y = y.data_ptr();
  p.num_sms = comm.num_sms;
  check_smem(combine_smem(p), op, comm);
  check_launch(low_latency ? launch_low_latency_combine(p, stream) : launch_combine(p, stream), op);
  return y;
}

at::Tensor combine_cuda(const at::Tensor& expert_out, const at::Tensor& topk_idx,
                        const at::Tensor& topk_weights, const at::Tensor& token_rows,
                        const at::Tensor& expert_offsets, const at::Tensor& workspace,
                        const at::Tensor& peer_ptrs, c10::string_view group_name,
                        at::IntArrayRef plan, int64_t num_sms) {
  const char* op = "combine";
  c10::cuda::CUDAGuard guard(workspace.device());
  const Comm comm = check_comm(workspace, peer_ptrs, plan, num_sms, op);
  return run_combine(expert_out, topk_idx, topk_weights, token_rows, expert_offsets, comm,
                     /*low_latency=*/false, op);
}

at::Tensor low_latency_combine_cuda(const at::Tensor& expert_out, const at::Tensor& topk_idx,
                                    const at::Tensor& topk_weights, const at::Tensor& token_rows,
                                    const at::Tensor& recv_counts, const at::Tensor& workspace,
                                    const at::Tensor& peer_ptrs, c10::string_view group_name,
                                    at::IntArrayRef plan, int64_t num_sms) {
  const char* op = "low_latency_combine";
  c10::cuda::CUDAGuard guard(workspace.device());
  const Comm comm = check_comm(workspace, peer_ptrs, plan, num_sms, op);
  TORCH_CHECK(comm.ll_max_tokens > 0, "swiftep::low_latency_combine: the plan has no "
              "low-latency windows (ll_max_tokens_per_rank=0)");
  return run_combine(expert_out, topk_idx, topk_weights, token_rows, recv_counts, comm,
                     /*low_latency=*/true, op);
}

}  // namespace
}  // namespace swiftep

TORCH_LIBRARY_IMPL(swiftep, CUDA, m) {
  m.impl("dispatch_layout", &swiftep::dispatch_layout_cuda);
  m.impl("dispatch", &swiftep::dispatch_cuda);
  m.impl("combine", &swiftep::combine_cuda);
  m.impl("low_latency_dispatch", &swiftep::low_latency_dispatch_cuda);
  m.impl("low_latency_combine", &swiftep::low_latency_combine_cuda);
}

// `import torch_swiftep._C` loads this library (running the registration above); the Python
// module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                   nullptr,               nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
