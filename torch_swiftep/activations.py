"""The SwiGLU between an expert MLP's grouped GEMMs, over the rows a dispatch filled.

    gate_up = torch._grouped_mm(handle.recv_x, w_gate_up, offs=handle.expert_offsets[1:])
    hidden = torch_swiftep.swiglu_rows(gate_up, handle.expert_offsets[1:])
    out = torch._grouped_mm(hidden, w_down, offs=handle.expert_offsets[1:])

A throughput window has `capacity` rows and a call fills expert_offsets[-1] of them. The grouped
GEMMs stop at their offsets, but `F.silu(gate) * up` runs over every row of the window: with a
capacity of 1.5x the expected rows, a third of its bytes are wasted, and a pipelined layer
whose chunks each fill a fraction of the window pays the whole window per chunk. This op reads
the row count on the device (no host sync: CUDA graphs and the pipeline's streams keep going).
"""
from __future__ import annotations

import torch

from .ops import BY_NAME


def swiglu_rows(gate_up: torch.Tensor, row_ends: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows [0, row_ends[-1]) of gate_up [rows, 2 * width] (gate first);
    the other rows of the [rows, width] result are unspecified on CUDA. Bit for bit
    `F.silu(gate) * up` on the rows it computes (docs/ops.md, swiglu_rows)."""
    BY_NAME["swiglu_rows"].check(gate_up, row_ends)
    return torch.ops.swiftep.swiglu_rows(gate_up, row_ends)
