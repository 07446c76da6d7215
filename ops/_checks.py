"""Argument checks the contracts are built from. Each error names the argument and the value.

Shape, dtype and device rules only: they cost no device work and no sync. Rules that need the
data (indices in range, capacity) are checked where the data is: in the CUDA kernels, which
report through the communicator's status word, and in the CPU backend.
"""
from __future__ import annotations

import torch

from .protocol import (
    FP8_BLOCK,
    FP8_DTYPE,
    INDEX_DTYPES,
    MAX_TOPK,
    SUPPORTED_DTYPES,
    ll_rows_per_expert,
    num_local_experts,
    plan_value,
)


def check_tensor(name: str, t, *, dim: int, dtypes, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {tuple(dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the communicator is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {t.stride()} for shape "
                         f"{tuple(t.shape)}); call .contiguous() first")


def check_num_sms(num_sms) -> None:
    if not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms <= 0:
        raise ValueError(f"num_sms must be a positive int, got {num_sms!r}")


def check_low_latency_windows(plan) -> None:
    if plan_value(plan, "ll_max_tokens_per_rank") <= 0:
        raise ValueError("this Communicator has no low-latency windows: build it with "
                         "CommConfig(ll_max_tokens_per_rank=T) with T > 0")


def check_routing(topk_idx, topk_weights, num_tokens: int, plan, device=None) -> None:
    num_experts = plan_value(plan, "num_experts")
    check_tensor("topk_idx", topk_idx, dim=2, dtypes=INDEX_DTYPES, device=device)
    check_tensor("topk_weights", topk_weights, dim=2, dtypes=(torch.float32,), device=device)
    k = topk_idx.size(1)
    if topk_idx.size(0) != num_tokens:
        raise ValueError(f"topk_idx has {topk_idx.size(0)} tokens but x has {num_tokens} "
                         f"(topk_idx.shape={tuple(topk_idx.shape)})")
    if tuple(topk_weights.shape) != tuple(topk_idx.shape):
        raise ValueError(f"topk_weights.shape={tuple(topk_weights.shape)} must equal "
                         f"topk_idx.shape={tuple(topk_idx.shape)}")
    if k < 1 or k > num_experts:
        raise ValueError(f"topk_idx has num_topk={k}; it must be in [1, num_experts="
                         f"{num_experts}]")
    configured_k = plan_value(plan, "num_topk")
    if k > configured_k:
        raise ValueError(f"topk_idx has num_topk={k}, more than the communicator's "
                         f"num_topk={configured_k}")
    if k > MAX_TOPK:
        raise ValueError(f"topk_idx has num_topk={k}, more than the {MAX_TOPK} the kernels "
                         "support (one lane of a warp per slot)")


def _check_x(x, x_scales, plan, max_tokens: int, device) -> None:
    hidden = plan_value(plan, "hidden")
    check_tensor("x", x, dim=2, dtypes=SUPPORTED_DTYPES + (FP8_DTYPE,), device=device)
    if x.size(1) != hidden:
        raise ValueError(f"x has hidden={x.size(1)} (shape {tuple(x.shape)}), the communicator "
                         f"was built for hidden={hidden}")
    if x.size(0) > max_tokens:
        raise ValueError(f"x has {x.size(0)} tokens, more than max_tokens_per_rank={max_tokens} "
                         "this communicator was built for")
    window_elem = plan_value(plan, "row_bytes") // hidden
    if x.element_size() > window_elem:
        raise TypeError(f"x has dtype {x.dtype}, wider than the communicator's windows "
                        f"({window_elem} bytes per element)")
    if x.dtype == FP8_DTYPE:
        if x_scales is None:
            raise ValueError("x is float8_e4m3fn: x_scales [num_tokens, hidden / 128] float32 "
                             "is required")
        if hidden % FP8_BLOCK != 0:
            raise ValueError(f"FP8 dispatch needs hidden % {FP8_BLOCK} == 0, got hidden={hidden}")
        check_tensor("x_scales", x_scales, dim=2, dtypes=(torch.float32,), device=device)
        want = (x.size(0), hidden // FP8_BLOCK)
        if tuple(x_scales.shape) != want:
            raise ValueError(f"x_scales.shape={tuple(x_scales.shape)} must be {want}")
    elif x_scales is not None:
        raise ValueError(f"x_scales is given but x has dtype {x.dtype}; scales go with "
                         "float8_e4m3fn x")


def check_quantize(x, x_scales, quantize_fp8) -> None:
    """quantize_fp8=True: x is bf16/fp16/fp32 [num_tokens, hidden % 128 == 0], no x_scales."""
    if not isinstance(quantize_fp8, bool):
        raise TypeError(f"quantize_fp8 must be a bool, got {quantize_fp8!r}")
    if not quantize_fp8:
        return
    check_tensor("x", x, dim=2, dtypes=SUPPORTED_DTYPES)
    if x_scales is not None:
        raise ValueError("quantize_fp8=True makes the scales: pass no x_scales (got a tensor of "
                         f"shape {tuple(x_scales.shape)})")
    if x.size(1) % FP8_BLOCK != 0:
        raise ValueError(f"quantize_fp8=True needs hidden % {FP8_BLOCK} == 0, got "
                         f"x.shape={tuple(x.shape)}")


def check_dispatch(x, x_scales, topk_idx, topk_weights, workspace, plan, num_sms, quantize_fp8,
                   *, low_latency: bool) -> None:
    """Both dispatch schedules: the op's arguments against the plan."""
    if low_latency:
        check_low_latency_windows(plan)
    check_num_sms(num_sms)
    check_quantize(x, x_scales, quantize_fp8)
    max_tokens = plan_value(plan, "ll_max_tokens_per_rank" if low_latency
                            else "max_tokens_per_rank")
    _check_x(x, x_scales, plan, max_tokens, workspace.device)
    check_routing(topk_idx, topk_weights, x.size(0), plan, workspace.device)


def _check_expert_out(expert_out, plan, device, low_latency: bool) -> None:
    hidden = plan_value(plan, "hidden")
    check_tensor("expert_out", expert_out, dim=3 if low_latency else 2, dtypes=SUPPORTED_DTYPES,
                 device=device)
    if expert_out.size(-1) != hidden:
        raise ValueError(f"expert_out has hidden={expert_out.size(-1)} (shape "
                         f"{tuple(expert_out.shape)}), the communicator was built for "
                         f"hidden={hidden}")
    if low_latency:
        want = (num_local_experts(plan), ll_rows_per_expert(plan), hidden)
        if tuple(expert_out.shape) != want:
            raise ValueError(f"expert_out has shape {tuple(expert_out.shape)}; the low-latency "
                             f"window is {want} (low_latency_combine_buffer())")
    else:
        capacity = plan_value(plan, "capacity")
        if expert_out.size(0) < capacity:
            raise ValueError(f"expert_out has {expert_out.size(0)} rows (shape "
                             f"{tuple(expert_out.shape)}); it must cover the window of "
                             f"{capacity} rows")
    window_elem = plan_value(plan, "row_bytes") // hidden
    if expert_out.element_size() > window_elem:
        raise TypeError(f"expert_out has dtype {expert_out.dtype}, wider than the "
                        f"communicator's windows ({window_elem} bytes per element)")


def check_combine(expert_out, topk_idx, topk_weights, token_rows, counts, workspace, plan,
                  num_sms, *, low_latency: bool) -> None:
    """Both combine schedules; counts: expert_offsets [L + 1] or recv_counts [L], int32."""
    if low_latency:
        check_low_latency_windows(plan)
    check_num_sms(num_sms)
    device = workspace.device
    _check_expert_out(expert_out, plan, device, low_latency)
    check_tensor("topk_idx", topk_idx, dim=2, dtypes=INDEX_DTYPES, device=device)
    check_routing(topk_idx, topk_weights, topk_idx.size(0), plan, device)
    check_tensor("token_rows", token_rows, dim=2, dtypes=(torch.int32,), device=device)
    if tuple(token_rows.shape) != tuple(topk_idx.shape):
        raise ValueError(f"token_rows.shape={tuple(token_rows.shape)} must equal "
                         f"topk_idx.shape={tuple(topk_idx.shape)} (pass the handle of the "
                         "matching dispatch)")
    name = "recv_counts" if low_latency else "expert_offsets"
    length = num_local_experts(plan) + (0 if low_latency else 1)
    check_tensor(name, counts, dim=1, dtypes=(torch.int32,), device=device)
    if counts.numel() != length:
        raise ValueError(f"{name} has {counts.numel()} entries, must be {length} (pass the "
                         "handle of the matching dispatch)")


# ------------------------------------------------------------------ shape facts for the fakes
# The same rules as above, stated with torch._check so that FakeTensor / torch.compile tracing
# knows them (sizes may be symbolic there; dtypes and ranks are the check functions' job).
def dispatch_shape_facts(x, x_scales, topk_idx, topk_weights, plan) -> None:
    torch._check(x.dim() == 2 and topk_idx.dim() == 2, lambda: "x and topk_idx must be 2-D")
    torch._check(x.size(1) == plan_value(plan, "hidden"),
                 lambda: f"x has hidden={x.size(1)}, the plan says {plan_value(plan, 'hidden')}")
    torch._check(topk_idx.size(0) == x.size(0),
                 lambda: f"topk_idx has {topk_idx.size(0)} tokens but x has {x.size(0)}")
    torch._check(topk_weights.shape == topk_idx.shape,
                 lambda: f"topk_weights.shape={tuple(topk_weights.shape)} must equal "
                         f"topk_idx.shape={tuple(topk_idx.shape)}")
    if x_scales is not None:
        torch._check(x_scales.size(0) == x.size(0), lambda: "x_scales must have x's tokens")


def combine_shape_facts(expert_out, topk_idx, topk_weights, token_rows, plan) -> None:
    torch._check(expert_out.size(-1) == plan_value(plan, "hidden"),
                 lambda: f"expert_out has hidden={expert_out.size(-1)}, the plan says "
                         f"{plan_value(plan, 'hidden')}")
    torch._check(topk_weights.shape == topk_idx.shape and token_rows.shape == topk_idx.shape,
                 lambda: "topk_weights and token_rows must have topk_idx's shape")
