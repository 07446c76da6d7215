// The binding's shared part (torch-aware; csrc/binding only): the one check macro, the checks
// every op family makes, and the launch-result check. The ops' argument rules are checked once,
// in Python, by each op's contract (ops/); these checks are the last line for a direct caller
// of torch.ops.swiftep.*, and keep only what protects memory: device and contiguity of every
// tensor a kernel dereferences, dtypes a kernel reinterprets, and the sizes that bound the
// kernels' accesses.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "swiftep/launchers.h"
#include "swiftep/params.h"

// SWIFTEP_CHECK(kind, cond, message...): when cond is false, throws kind's exception with the
// message after "swiftep::<op>: ", where `op` (const char*, the op's name) must be in scope.
// Kinds, matching the Python checks: TYPE (TypeError: a wrong dtype), VALUE (ValueError: a wrong
// device, layout, shape, size or value), INDEX (IndexError: an index out of range), RUNTIME
// (RuntimeError: a failed launch).
#define SWIFTEP_CHECK(kind, cond, ...) \
  SWIFTEP_CHECK_##kind(cond, "swiftep::", op, ": ", __VA_ARGS__)
#define SWIFTEP_CHECK_TYPE TORCH_CHECK_TYPE
#define SWIFTEP_CHECK_VALUE TORCH_CHECK_VALUE
#define SWIFTEP_CHECK_INDEX TORCH_CHECK_INDEX
#define SWIFTEP_CHECK_RUNTIME TORCH_CHECK

namespace swiftep {
namespace binding {

// t is a contiguous CUDA tensor on `device` (the workspace's).
void check_cuda(const at::Tensor& t, const char* op, const char* name, const at::Device& device);

// The workspace, the peer table and the plan of a communication op, decoded. Checks the plan's
// length, the workspace's size and alignment, the plan values that index peers (world_size,
// num_experts, rank) and the peer table's length.
CommParams check_comm(const at::Tensor& workspace, const at::Tensor& peer_ptrs,
                      at::IntArrayRef plan, const char* op);

// topk_idx [num_tokens, K] int64/int32 and topk_weights [num_tokens, K] float32 on `device`,
// with 1 <= K <= min(kMaxTopk, the plan's num_topk) and num_tokens * K within int32. Returns K.
int64_t check_routing(const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                      int64_t num_tokens, const CommParams& comm, const at::Device& device,
                      const char* op);

// The DType of a bfloat16 / float16 / float32 tensor; false for any other dtype.
bool to_dtype(at::ScalarType type, DType* out);

// Throws when a launcher refused the shared memory (ValueError, with comm's sizes when given)
// or a launch failed (RuntimeError).
void check_launch(const LaunchResult& result, const char* op, const CommParams* comm = nullptr);

}  // namespace binding
}  // namespace swiftep
