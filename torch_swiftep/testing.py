"""Inputs and checks shared by the tests, the GPU round and the benchmark.

Every rank can build every rank's inputs from one seed, so a rank compares its own results with
the whole-world reference without any extra communication.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import reference
from .fp8 import quantize_fp8

ROUTINGS = ("uniform", "skewed", "holes", "one_rank")


def random_routing(gen: torch.Generator, num_tokens: int, num_experts: int, num_topk: int,
                   kind: str, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx [N, K] int64, topk_weights [N, K] float32) of one rank.

    uniform: K distinct experts per token, uniformly drawn.
    skewed: every token's slot 0 is expert 0 (all tokens to one expert), other slots uniform.
    holes: uniform, then a quarter of the entries (and every 7th token entirely) set to -1.
    one_rank: every expert of every token lives on the last rank.
    """
    if kind not in ROUTINGS:
        raise ValueError(f"routing kind must be one of {ROUTINGS}, got {kind!r}")
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if kind == "one_rank":
        local = num_experts // world_size
        scores[:, : num_experts - local] = -1.0
    if kind == "skewed":
        scores[:, 0] = 2.0  # expert 0 wins slot 0 for every token
    idx = scores.topk(num_topk, dim=1).indices
    weights = torch.rand(num_tokens, num_topk, generator=gen) + 0.1
    if kind == "holes":
        holes = torch.rand(num_tokens, num_topk, generator=gen) < 0.25
        holes[::7] = True
        idx = idx.masked_fill(holes, -1)
    return idx.contiguous(), weights.float().contiguous()


@dataclass
class WorldInputs:
    xs: list
    x_scales: Optional[list]
    topk_idx: list
    topk_weights: list


def world_inputs(seed: int, tokens_per_rank: Sequence[int], hidden: int, num_experts: int,
                 num_topk: int, dtype: torch.dtype, routing: str = "uniform",
                 fp8: bool = False) -> WorldInputs:
    """Every rank's inputs, identical on every rank (drawn on the CPU from one seed)."""
    gen = torch.Generator().manual_seed(seed)
    world = len(tokens_per_rank)
    xs, scales, idxs, ws = [], [], [], []
    for n in tokens_per_rank:
        x = torch.randn(n, hidden, generator=gen).to(dtype)
        idx, w = random_routing(gen, n, num_experts, num_topk, routing, world)
        if fp8:
            x, s = quantize_fp8(x)
            scales.append(s)
        xs.append(x)
        idxs.append(idx)
        ws.append(w)
    return WorldInputs(xs, scales if fp8 else None, idxs, ws)


def fake_expert(recv_x: torch.Tensor, expert_offsets: torch.Tensor, out_dtype: torch.dtype,
                recv_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A cheap, expert-dependent function of the rows: row * (1 + j/8) for local expert j.
    Returns [rows, hidden] in out_dtype (rows past expert_offsets[-1] are zeros)."""
    rows = recv_x.size(0)
    x = recv_x.float()
    if recv_scales is not None:
        hidden = x.size(1)
        x = (x.view(rows, hidden // 128, 128) * recv_scales.float().unsqueeze(-1)).view(
            rows, hidden)
    offs = expert_offsets.long().to(recv_x.device)
    row_ids = torch.arange(rows, device=recv_x.device)
    expert = torch.bucketize(row_ids, offs[1:], right=True)
    scale = torch.where(row_ids < offs[-1], 1.0 + expert.float() / 8, torch.zeros(()).to(x))
    return (x * scale.unsqueeze(1)).to(out_dtype)


def compare_dispatch(rank: int, got, ref: reference.RefDispatch, ref_token_rows) -> list[str]:
    """Bit-exact comparison of one rank's DispatchResult with the reference."""
    errors = []
    offs = got.expert_offsets.cpu()
    if not torch.equal(offs, ref.expert_offsets):
        errors.append(f"rank {rank}: expert_offsets {offs.tolist()} != "
                      f"{ref.expert_offsets.tolist()}")
        return errors
    rows = int(offs[-1])
    for name, a, b in (
        ("recv_x", got.recv_x[:rows], ref.recv_x),
        ("recv_src", got.recv_src[:rows], ref.recv_src),
        ("recv_weights", got.recv_weights[:rows], ref.recv_weights),
        ("token_rows", got.token_rows, ref_token_rows),
    ) + ((("recv_scales", got.recv_scales[:rows], ref.recv_scales),)
         if ref.recv_scales is not None else ()):
        a = a.cpu()
        if a.dtype != b.dtype or not torch.equal(_bits(a), _bits(b)):
            bad = (_bits(a) != _bits(b)).nonzero()[:3].tolist() if a.shape == b.shape else "shape"
            errors.append(f"rank {rank}: {name} differs from the reference (first at {bad}; "
                          f"shapes {tuple(a.shape)} vs {tuple(b.shape)})")
    return errors


def compare_low_latency(rank: int, got, ref: reference.RefLowLatencyDispatch,
                        ref_token_rows) -> list[str]:
    errors = []
    counts = got.recv_counts.cpu()
    if not torch.equal(counts, ref.recv_counts):
        return [f"rank {rank}: recv_counts {counts.tolist()} != {ref.recv_counts.tolist()}"]
    if not torch.equal(got.token_rows.cpu(), ref_token_rows):
        errors.append(f"rank {rank}: token_rows differ from the reference")
    for j, c in enumerate(counts.tolist()):
        for name, a, b in (("recv_x", got.recv_x, ref.recv_x), ("recv_src", got.recv_src,
                                                                 ref.recv_src),
                           ("recv_weights", got.recv_weights, ref.recv_weights)):
            if not torch.equal(_bits(a[j, :c].cpu()), _bits(b[j, :c])):
                errors.append(f"rank {rank}: {name} of local expert {j} differs")
    return errors


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    """None if a ~= b for the combine output's dtype, else a message."""
    a, b = a.float().cpu(), b.float().cpu()
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not torch.isfinite(a).all():
        return "non-finite values"
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    if err > tol * max(scale, 1.0):
        return f"max abs error {err:.3g} > {tol} * max(|ref|={scale:.3g}, 1)"
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Compare floating tensors bit for bit (so NaN == NaN and -0 != +0 like memcmp)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    return t
