"""Input checks shared by every backend. Each error names the argument and the value.

Shape, dtype and device checks cost no device work and run on every call. Value checks
(indices in range) need the data: the CPU backend runs them on the host; CUDA kernels check
in place and report through the communicator's status word (see torch_swiftep/status.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .plan import FP8_BLOCK, FP8_DTYPE, SUPPORTED_DTYPES, plan_value

INDEX_DTYPES = (torch.int64, torch.int32)


def _fail(message: str, exc=ValueError):
    raise exc(message)


def check_tensor(name: str, t, *, dim: int, dtypes, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.dim() != dim:
        _fail(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        _fail(f"{name} must have dtype in {tuple(dtypes)}, got {t.dtype}", TypeError)
    if device is not None and t.device != device:
        _fail(f"{name} is on {t.device}, but the communicator is on {device}")
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous (got strides {t.stride()} for shape "
              f"{tuple(t.shape)}); call .contiguous() first")


def check_routing(topk_idx, topk_weights, num_tokens: int, plan, device=None) -> None:
    num_experts = plan_value(plan, "num_experts")
    check_tensor("topk_idx", topk_idx, dim=2, dtypes=INDEX_DTYPES, device=device)
    check_tensor("topk_weights", topk_weights, dim=2, dtypes=(torch.float32,), device=device)
    k = topk_idx.size(1)
    if topk_idx.size(0) != num_tokens:
        _fail(f"topk_idx has {topk_idx.size(0)} tokens but x has {num_tokens} "
              f"(topk_idx.shape={tuple(topk_idx.shape)})")
    if tuple(topk_weights.shape) != tuple(topk_idx.shape):
        _fail(f"topk_weights.shape={tuple(topk_weights.shape)} must equal "
              f"topk_idx.shape={tuple(topk_idx.shape)}")
    if k < 1 or k > num_experts:
        _fail(f"topk_idx has num_topk={k}; it must be in [1, num_experts={num_experts}]")
    configured_k = plan_value(plan, "num_topk")
    if k > configured_k:
        _fail(f"topk_idx has num_topk={k}, more than the communicator's num_topk={configured_k}")


def check_index_values(topk_idx: torch.Tensor, num_experts: int) -> None:
    """Host-side range check: -1 or [0, num_experts). Syncs when topk_idx is on a GPU."""
    if topk_idx.numel() == 0:
        return
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        n, k = (int(v) for v in bad.nonzero()[0])
        _fail(f"topk_idx[{n}, {k}] = {int(topk_idx[n, k])} is out of range: entries must be "
              f"-1 (no expert) or in [0, num_experts={num_experts})", IndexError)


def check_dispatch_inputs(x, x_scales: Optional[torch.Tensor], topk_idx, topk_weights, plan,
                          *, max_tokens: int, device=None) -> None:
    hidden = plan_value(plan, "hidden")
    check_tensor("x", x, dim=2, dtypes=SUPPORTED_DTYPES + (FP8_DTYPE,), device=device)
    if x.size(1) != hidden:
        _fail(f"x has hidden={x.size(1)} (shape {tuple(x.shape)}), the communicator was "
              f"built for hidden={hidden}")
    if x.size(0) > max_tokens:
        _fail(f"x has {x.size(0)} tokens, more than max_tokens_per_rank={max_tokens} this "
              "communicator was built for")
    if x.element_size() > plan_value(plan, "row_bytes") // hidden:
        _fail(f"x has dtype {x.dtype}, wider than the communicator's windows "
              f"({plan_value(plan, 'row_bytes') // hidden} bytes per element)", TypeError)
    if x.dtype == FP8_DTYPE:
        if x_scales is None:
            _fail("x is float8_e4m3fn: x_scales [num_tokens, hidden / 128] float32 is required")
        if hidden % FP8_BLOCK != 0:
            _fail(f"FP8 dispatch needs hidden % {FP8_BLOCK} == 0, got hidden={hidden}")
        check_tensor("x_scales", x_scales, dim=2, dtypes=(torch.float32,), device=device)
        want = (x.size(0), hidden // FP8_BLOCK)
        if tuple(x_scales.shape) != want:
            _fail(f"x_scales.shape={tuple(x_scales.shape)} must be {want}")
    elif x_scales is not None:
        _fail(f"x_scales is given but x has dtype {x.dtype}; scales go with float8_e4m3fn x")
    check_routing(topk_idx, topk_weights, x.size(0), plan, device)


def check_quantize_input(x, x_scales: Optional[torch.Tensor]) -> None:
    """quantize_fp8=True: x is bf16/fp16/fp32 [num_tokens, hidden % 128 == 0], no x_scales."""
    check_tensor("x", x, dim=2, dtypes=SUPPORTED_DTYPES)
    if x_scales is not None:
        _fail("quantize_fp8=True makes the scales: pass no x_scales (got a tensor of shape "
              f"{tuple(x_scales.shape)})")
    if x.size(1) % FP8_BLOCK != 0:
        _fail(f"quantize_fp8=True needs hidden % {FP8_BLOCK} == 0, got x.shape={tuple(x.shape)}")


def check_combine_inputs(expert_out, topk_idx, topk_weights, token_rows, plan, *,
                         min_rows: int, device=None, dim: int = 2) -> None:
    hidden = plan_value(plan, "hidden")
    check_tensor("expert_out", expert_out, dim=dim, dtypes=SUPPORTED_DTYPES, device=device)
    if expert_out.size(-1) != hidden:
        _fail(f"expert_out has hidden={expert_out.size(-1)} (shape {tuple(expert_out.shape)}), "
              f"the communicator was built for hidden={hidden}")
    rows = expert_out.numel() // hidden
    if rows < min_rows:
        _fail(f"expert_out has {rows} rows (shape {tuple(expert_out.shape)}); it must cover the "
              f"window of {min_rows} rows")
    if expert_out.element_size() > plan_value(plan, "row_bytes") // hidden:
        _fail(f"expert_out has dtype {expert_out.dtype}, wider than the communicator's windows",
              TypeError)
    check_tensor("topk_idx", topk_idx, dim=2, dtypes=INDEX_DTYPES, device=device)
    check_routing(topk_idx, topk_weights, topk_idx.size(0), plan, device)
    check_tensor("token_rows", token_rows, dim=2, dtypes=(torch.int32,), device=device)
    if tuple(token_rows.shape) != tuple(topk_idx.shape):
        _fail(f"token_rows.shape={tuple(token_rows.shape)} must equal "
              f"topk_idx.shape={tuple(topk_idx.shape)} (pass the handle of the matching "
              "dispatch)")
