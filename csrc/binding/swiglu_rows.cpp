// CUDA implementation of swiftep::swiglu_rows (schema: ops/swiglu_rows.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common.h"
#include "swiftep/launchers.h"
#include "swiftep/params.h"

namespace swiftep {
namespace binding {
namespace {

at::Tensor swiglu_rows_cuda(const at::Tensor& gate_up, const at::Tensor& row_ends) {
  const char* op = "swiglu_rows";
  SWIFTEP_CHECK(VALUE, gate_up.is_cuda() && gate_up.is_contiguous() && gate_up.dim() == 2,
                "gate_up must be a contiguous 2-D CUDA tensor, got shape ", gate_up.sizes(),
                " on ", gate_up.device());
  SWIFTEP_CHECK(VALUE, gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns "
                "(gate then up), got shape ", gate_up.sizes());
  DType dtype{};
  SWIFTEP_CHECK(TYPE, to_dtype(gate_up.scalar_type(), &dtype),
                "gate_up must be bfloat16, float16 or float32, got ", gate_up.scalar_type());
  SWIFTEP_CHECK(VALUE, row_ends.device() == gate_up.device() && row_ends.is_contiguous() &&
                           row_ends.dim() == 1 && row_ends.numel() >= 1,
                "row_ends must be a contiguous non-empty 1-D tensor on gate_up's device ",
                gate_up.device(), ", got shape ", row_ends.sizes(), " on ", row_ends.device());
  SWIFTEP_CHECK(TYPE, row_ends.scalar_type() == at::kInt, "row_ends must be int32, got ",
                row_ends.scalar_type());
  c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), width}, gate_up.options());
  SwigluRowsParams p{};
  p.gate_up = gate_up.data_ptr();
  p.out = out.data_ptr();
  p.row_ends = row_ends.data_ptr<int32_t>();
  p.num_row_ends = static_cast<int32_t>(row_ends.numel());
  p.rows = gate_up.size(0);
  p.width = width;
  p.dtype = dtype;
  check_launch(launch_swiglu_rows(p, c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

}  // namespace
}  // namespace binding
}  // namespace swiftep

TORCH_LIBRARY_IMPL(swiftep, CUDA, m) {
  m.impl("swiglu_rows", &swiftep::binding::swiglu_rows_cuda);
}
