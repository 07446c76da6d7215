// CUDA implementation of swiftep::dispatch_layout (schema: ops/dispatch_layout.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <tuple>

#include "common.h"
#include "swiftep/launchers.h"
#include "swiftep/params.h"

namespace swiftep {
namespace binding {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_layout_cuda(const at::Tensor& topk_idx,
                                                                    int64_t num_experts,
                                                                    int64_t world_size) {
  const char* op = "dispatch_layout";
  const at::Device device = topk_idx.device();
  check_cuda(topk_idx, op, "topk_idx", device);
  SWIFTEP_CHECK(VALUE, topk_idx.dim() == 2, "topk_idx must be 2-D, got shape ", topk_idx.sizes());
  SWIFTEP_CHECK(TYPE, topk_idx.scalar_type() == at::kLong || topk_idx.scalar_type() == at::kInt,
                "topk_idx must be int64 or int32, got ", topk_idx.scalar_type());
  SWIFTEP_CHECK(VALUE,
                world_size > 0 && num_experts > 0 && num_experts % world_size == 0 &&
                    num_experts <= INT_MAX,
                "need num_experts % world_size == 0, got num_experts=", num_experts,
                ", world_size=", world_size);
  SWIFTEP_CHECK(VALUE, topk_idx.numel() <= INT_MAX, "too many entries: ", topk_idx.numel());
  // This op has no status word to report through, so it checks the values on the host (one
  // sync) rather than silently counting an out-of-range entry as "no expert"; skipped while a
  // CUDA graph is being captured, where a sync is not allowed. An IndexError, as on the CPU
  // backend, thrown before the device guard below exists: on the GPU machine (torch 2.11) an
  // error thrown from this library while a CUDAGuard was alive crashed the interpreter instead
  // of reaching Python.
  if (topk_idx.numel() > 0 &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    int64_t lo = 0, hi = 0;
    {
      c10::cuda::CUDAGuard sync_guard(device);
      const auto [lowest, highest] = at::aminmax(topk_idx);
      lo = lowest.item<int64_t>();
      hi = highest.item<int64_t>();
    }
    SWIFTEP_CHECK(INDEX, lo >= -1 && hi < num_experts, "topk_idx has values in [", lo, ", ", hi,
                  "]; entries must be -1 (no expert) or in [0, num_experts=", num_experts, ")");
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

}  // namespace
}  // namespace binding
}  // namespace swiftep

TORCH_LIBRARY_IMPL(swiftep, CUDA, m) {
  m.impl("dispatch_layout", &swiftep::binding::dispatch_layout_cuda);
}
