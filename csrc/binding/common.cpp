// The binding's shared checks (common.h).
#include "common.h"

#include <climits>

namespace swiftep {
namespace binding {

void check_cuda(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  SWIFTEP_CHECK(VALUE, t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  SWIFTEP_CHECK(VALUE, t.device() == device, name, " is on ", t.device(),
                " but the workspace is on ", device);
  SWIFTEP_CHECK(VALUE, t.is_contiguous(), name, " must be contiguous (got strides ", t.strides(),
                " for shape ", t.sizes(), ")");
}

CommParams check_comm(const at::Tensor& workspace, const at::Tensor& peer_ptrs,
                      at::IntArrayRef plan, const char* op) {
  SWIFTEP_CHECK(VALUE, static_cast<int64_t>(plan.size()) == kPlanNumFields, "plan has ",
                plan.size(), " fields, this build of torch_swiftep._C expects ", kPlanNumFields,
                " (pass torch_swiftep.plan.Plan.as_list(); rebuild the extension if "
                "ops/protocol.py changed)");
  const at::Device device = workspace.device();
  check_cuda(workspace, op, "workspace", device);
  SWIFTEP_CHECK(TYPE, workspace.scalar_type() == at::kByte, "workspace must be uint8, got ",
                workspace.scalar_type());
  SWIFTEP_CHECK(VALUE, workspace.dim() == 1 && workspace.numel() == plan[kPlan_workspace_bytes],
                "workspace must be 1-D of workspace_bytes=", plan[kPlan_workspace_bytes],
                " bytes (the plan), got shape ", workspace.sizes());
  SWIFTEP_CHECK(VALUE, reinterpret_cast<uintptr_t>(workspace.data_ptr()) % 16 == 0,
                "workspace must be 16-byte aligned (bulk copies), got address ",
                workspace.data_ptr());
  const int64_t world = plan[kPlan_world_size];
  const int64_t experts = plan[kPlan_num_experts];
  SWIFTEP_CHECK(VALUE, world > 0 && experts > 0 && experts % world == 0, "plan has world_size=",
                world, ", num_experts=", experts, " (need num_experts % world_size == 0)");
  SWIFTEP_CHECK(VALUE, plan[kPlan_rank] >= 0 && plan[kPlan_rank] < world, "plan has rank=",
                plan[kPlan_rank], " outside [0, world_size=", world, ")");
  check_cuda(peer_ptrs, op, "peer_ptrs", device);
  SWIFTEP_CHECK(TYPE, peer_ptrs.scalar_type() == at::kLong, "peer_ptrs must be int64, got ",
                peer_ptrs.scalar_type());
  SWIFTEP_CHECK(VALUE, peer_ptrs.dim() == 1 && peer_ptrs.numel() == world,
                "peer_ptrs must be [world_size=", world, "], got shape ", peer_ptrs.sizes());
  return decode_plan(plan.data(), static_cast<uint8_t*>(workspace.data_ptr()),
                     peer_ptrs.data_ptr<int64_t>());
}

int64_t check_routing(const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                      int64_t num_tokens, const CommParams& comm, const at::Device& device,
                      const char* op) {
  check_cuda(topk_idx, op, "topk_idx", device);
  check_cuda(topk_weights, op, "topk_weights", device);
  SWIFTEP_CHECK(VALUE, topk_idx.dim() == 2, "topk_idx must be 2-D, got shape ", topk_idx.sizes());
  SWIFTEP_CHECK(TYPE, topk_idx.scalar_type() == at::kLong || topk_idx.scalar_type() == at::kInt,
                "topk_idx must be int64 or int32, got ", topk_idx.scalar_type());
  SWIFTEP_CHECK(VALUE, topk_idx.size(0) == num_tokens, "topk_idx has ", topk_idx.size(0),
                " tokens, expected ", num_tokens);
  const int64_t k = topk_idx.size(1);
  SWIFTEP_CHECK(VALUE, k >= 1 && k <= comm.num_topk && k <= kMaxTopk, "topk_idx has num_topk=",
                k, "; it must be in [1, ", comm.num_topk, "] (the communicator's num_topk) and at "
                "most ", kMaxTopk, " (CUDA kernels: one lane per slot)");
  SWIFTEP_CHECK(TYPE, topk_weights.scalar_type() == at::kFloat,
                "topk_weights must be float32, got ", topk_weights.scalar_type());
  SWIFTEP_CHECK(VALUE, topk_weights.sizes() == topk_idx.sizes(), "topk_weights.shape=",
                topk_weights.sizes(), " must equal topk_idx.shape=", topk_idx.sizes());
  SWIFTEP_CHECK(VALUE, num_tokens <= INT_MAX / k, "too many tokens: ", num_tokens);
  return k;
}

bool to_dtype(at::ScalarType type, DType* out) {
  switch (type) {
    case at::kBFloat16: *out = DType::kBFloat16; return true;
    case at::kHalf: *out = DType::kFloat16; return true;
    case at::kFloat: *out = DType::kFloat32; return true;
    default: return false;
  }
}

void check_launch(const LaunchResult& result, const char* op, const CommParams* comm) {
  const SmemCheck& smem = result.smem;
  if (comm != nullptr) {
    SWIFTEP_CHECK(VALUE, smem.ok, "the kernel needs ", smem.needed_bytes,
                  " bytes of shared memory per block, the device allows ", smem.available_bytes,
                  " (num_experts=", comm->num_experts, ", hidden=", comm->hidden,
                  "); reduce num_experts / num_topk / tokens per call");
  }
  SWIFTEP_CHECK(VALUE, smem.ok, "the kernel needs ", smem.needed_bytes,
                " bytes of shared memory per block, the device allows ", smem.available_bytes);
  SWIFTEP_CHECK(RUNTIME, result.error == cudaSuccess, "kernel launch failed: ",
                cudaGetErrorString(result.error));
}

}  // namespace binding
}  // namespace swiftep
