"""The fused-experts math of the Transformers integration: one rank's experts run on the
expert-major rows that ``Communicator.dispatch`` delivers (see ``transformers.py``)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

# Parameters of a fused experts module that carry the expert dimension first.
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj",
                 "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


# ------------------------------------------------------------------------ fused experts
def is_fused_experts(module: torch.nn.Module) -> bool:
    """A Transformers experts module decorated with ``use_experts_implementation`` (3-D expert
    weights, called as ``experts(hidden_states, top_k_index, top_k_weights)``)."""
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed")
            and "down_proj" in module._parameters
            and ("gate_up_proj" in module._parameters or "up_proj" in module._parameters))


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is not None and hasattr(t, "to_local") and hasattr(t, "device_mesh"):
        return t.to_local()
    return t


def _expert_param_names(module: torch.nn.Module) -> list[str]:
    return [n for n in EXPERT_PARAMS if module._parameters.get(n) is not None]


@dataclasses.dataclass
class _LocalExperts:
    w_in: torch.Tensor  # [L, 2I or I, H] or transposed [L, H, 2I or I]
    b_in: torch.Tensor | None
    w_out: torch.Tensor  # [L, H, I] or transposed [L, I, H]
    b_out: torch.Tensor | None
    transposed: bool


def _local_experts(module: torch.nn.Module) -> _LocalExperts:
    has_gate = getattr(module, "has_gate", True)
    has_bias = getattr(module, "has_bias", False)
    first = "gate_up_proj" if has_gate else "up_proj"
    return _LocalExperts(
        w_in=_local(getattr(module, first)),
        b_in=_local(getattr(module, first + "_bias")) if has_bias else None,
        w_out=_local(module.down_proj),
        b_out=_local(module.down_proj_bias) if has_bias else None,
        transposed=bool(getattr(module, "is_transposed", False)),
    )


def _activation(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    if getattr(module, "has_gate", True):
        return module._apply_gate(h)  # the family's own gating (default: act(gate) * up)
    return module.act_fn(h)


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _use_grouped_mm(compute: str, x: torch.Tensor) -> bool:
    if compute == "loop":
        return False
    if compute == "grouped_mm":
        if _grouped_mm_fn() is None:
            raise RuntimeError("experts_compute='grouped_mm' but this torch has no grouped_mm")
        return True
    # auto: the grouped GEMM where it is the fast path (CUDA, 16-bit, sm80+)
    return (x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
            and _grouped_mm_fn() is not None
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def run_local_experts(module: torch.nn.Module, recv_x: torch.Tensor,
                      expert_offsets: torch.Tensor, rows: int, out: torch.Tensor,
                      compute: str = "auto") -> None:
    """This rank's experts on the expert-major rows ``recv_x[:rows]`` (local expert j owns
    ``[expert_offsets[j], expert_offsets[j+1])``); writes ``out[:rows]`` (unweighted: combine
    applies the routing weights)."""
    if rows == 0:
        return
    w = _local_experts(module)
    num_local = w.w_in.size(0)
    if expert_offsets.numel() != num_local + 1:
        raise RuntimeError(f"the communicator has {expert_offsets.numel() - 1} local experts but "
                           f"{type(module).__name__} holds {num_local}")
    post_norm = getattr(module, "post_expert_norm", None) \
        if getattr(module, "has_post_expert_norm", False) else None
    x = recv_x[:rows]
    if _use_grouped_mm(compute, x):
        mm = _grouped_mm_fn()
        offs = expert_offsets[1:].to(torch.int32)
        counts = expert_offsets.diff().long()
        row_expert = torch.repeat_interleave(
            torch.arange(num_local, device=x.device), counts, output_size=rows)
        w_in = w.w_in if w.transposed else w.w_in.transpose(-2, -1)
        w_out = w.w_out if w.transposed else w.w_out.transpose(-2, -1)
        h = mm(x.to(w_in.dtype), w_in, offs=offs)
        if w.b_in is not None:
            h = h + w.b_in[row_expert]
        h = _activation(module, h)
        h = mm(h.to(w_out.dtype), w_out, offs=offs)
        if w.b_out is not None:
            h = h + w.b_out[row_expert]
        if post_norm is not None:
            h = post_norm(h)
        out[:rows].copy_(h)
        return
    bounds = expert_offsets.tolist()  # one host sync for the whole loop
    for j in range(num_local):
        start, end = bounds[j], bounds[j + 1]
        if start == end:
            continue
        h = x[start:end]
        h = h @ w.w_in[j] if w.transposed else F.linear(h, w.w_in[j])
        if w.b_in is not None:
            h = h + w.b_in[j]
        h = _activation(module, h)
        h = h @ w.w_out[j] if w.transposed else F.linear(h, w.w_out[j])
        if w.b_out is not None:
            h = h + w.b_out[j]
        if post_norm is not None:
            h = post_norm(h)
        out[start:end].copy_(h)
