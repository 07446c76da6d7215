import torch

from ._checks import check_tensor
from ._contract import OpContract
from .protocol import SUPPORTED_DTYPES

SCHEMA = """swiglu_rows(
    Tensor gate_up,
    Tensor row_ends
) -> Tensor"""

DOC = """The SwiGLU between an expert MLP's two grouped GEMMs, over the rows a window holds; local.

A dispatch window has room for `capacity` rows, but a call fills only expert_offsets[-1] of
them, a number the host does not know (a sync would stall the pipeline and break CUDA graphs).
`F.silu(gate) * up` over the whole window costs the capacity's bytes; this op reads the row
count on the device and touches only the valid rows.

gate_up: [rows, 2 * width], bf16/fp16/fp32, contiguous: the first grouped GEMM's output (gate in
  columns [0, width), up in [width, 2 * width)).
row_ends: [num_groups >= 1], int32, on gate_up's device: end row of every group (the grouped
  GEMM's `offs`, e.g. a dispatch's expert_offsets[1:]); rows [0, min(row_ends[-1], rows)) are
  computed.
Returns out: [rows, width], gate_up's dtype. Row i < row_ends[-1]: silu(gate) * up computed as
  torch computes `F.silu(gate) * up` (silu in float32 rounded to the dtype, then the product
  rounded), bit for bit. Rows past row_ends[-1]: unspecified on CUDA (never written; the second
  grouped GEMM with the same offs does not read them), zeros on CPU.
"""


def check(gate_up, row_ends):
    check_tensor("gate_up", gate_up, dim=2, dtypes=SUPPORTED_DTYPES)
    if gate_up.size(1) % 2 != 0:
        raise ValueError(f"gate_up has {gate_up.size(1)} columns (shape "
                         f"{tuple(gate_up.shape)}); it must be even: gate then up")
    check_tensor("row_ends", row_ends, dim=1, dtypes=(torch.int32,))
    if row_ends.device != gate_up.device:
        raise ValueError(f"row_ends is on {row_ends.device}, gate_up on {gate_up.device}: both "
                         "must be on one device")
    if row_ends.numel() == 0:
        raise ValueError("row_ends is empty; it needs at least one group's end row")


def fake(gate_up, row_ends):
    torch._check(gate_up.dim() == 2, lambda: "gate_up must be 2-D")
    return gate_up.new_empty([gate_up.size(0), gate_up.size(1) // 2])


CONTRACT = OpContract("swiglu_rows", SCHEMA, DOC, check, fake)
