"""Pure-torch reference of the dispatch/combine contract, on whole-world inputs.

No communication: it takes every rank's inputs at once and returns every rank's outputs, so
each backend can be compared against it. It is written for obviousness, not speed.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch


class RefDispatch(NamedTuple):
    """One destination rank's view after dispatch. R = rows received."""

    recv_x: torch.Tensor  # [R, hidden], x's dtype
    recv_scales: Optional[torch.Tensor]  # [R, hidden / 128] float32, FP8 only
    recv_src: torch.Tensor  # [R, 2] int32: (source rank, source token)
    recv_weights: torch.Tensor  # [R] float32
    expert_offsets: torch.Tensor  # [num_local_experts + 1] int32


class RefLowLatencyDispatch(NamedTuple):
    recv_x: torch.Tensor  # [L, W * T, hidden]; rows >= recv_counts[j] are zero here
    recv_scales: Optional[torch.Tensor]  # [L, W * T, hidden / 128]
    recv_src: torch.Tensor  # [L, W * T, 2] int32
    recv_weights: torch.Tensor  # [L, W * T] float32
    recv_counts: torch.Tensor  # [L] int32


def dispatch(
    xs: Sequence[torch.Tensor],
    topk_idxs: Sequence[torch.Tensor],
    topk_weights: Sequence[torch.Tensor],
    num_experts: int,
    x_scales: Optional[Sequence[torch.Tensor]] = None,
) -> tuple[list[RefDispatch], list[torch.Tensor]]:
    """Dispatch of a whole world. Returns (per destination rank: RefDispatch,
    per source rank: token_rows [N_s, K] int32, -1 for no expert)."""
    world = len(xs)
    local = num_experts // world
    token_rows = [torch.full(t.shape, -1, dtype=torch.int32) for t in topk_idxs]
    # every source's tensors on the CPU once, not once per (destination, expert)
    idxs = [t.long().cpu() for t in topk_idxs]
    xs_cpu = [x.cpu() for x in xs]
    ws_cpu = [w.cpu().float() for w in topk_weights]
    scales_cpu = None if x_scales is None else [s.cpu() for s in x_scales]
    per_rank = []
    for dst in range(world):
        xs_out, scales_out, src_out, w_out, offsets = [], [], [], [], [0]
        base = 0  # rows already placed on this rank
        for j in range(local):
            expert = dst * local + j
            for src in range(world):
                # (token, slot) pairs of this source for this expert, in (token, slot) order
                tokens, slots = (idxs[src] == expert).nonzero(as_tuple=True)
                token_rows[src][tokens, slots] = torch.arange(
                    base, base + tokens.numel(), dtype=torch.int32
                )
                base += tokens.numel()
                xs_out.append(xs_cpu[src][tokens])
                if x_scales is not None:
                    scales_out.append(scales_cpu[src][tokens])
                src_out.append(
                    torch.stack([torch.full_like(tokens, src), tokens], dim=1).to(torch.int32)
                )
                w_out.append(ws_cpu[src][tokens, slots])
            offsets.append(base)
        hidden = xs[0].size(1)
        per_rank.append(
            RefDispatch(
                recv_x=torch.cat(xs_out) if xs_out else xs[0].new_empty(0, hidden).cpu(),
                recv_scales=torch.cat(scales_out) if x_scales is not None else None,
                recv_src=torch.cat(src_out) if src_out else torch.empty(0, 2, dtype=torch.int32),
                recv_weights=torch.cat(w_out) if w_out else torch.empty(0),
                expert_offsets=torch.tensor(offsets, dtype=torch.int32),
            )
        )
    return per_rank, token_rows


def combine(
    expert_outs: Sequence[torch.Tensor],
    topk_idxs: Sequence[torch.Tensor],
    topk_weights: Sequence[torch.Tensor],
    token_rows: Sequence[torch.Tensor],
    num_experts: int,
    *,
    ranks_per_node: Optional[int] = None,
) -> list[torch.Tensor]:
    """y[n] = sum_k w[n, k] * expert_outs[owner(n, k)][token_rows[n, k]], float32 accumulation
    in slot order, written in expert_outs' dtype; zeros for a token with no valid expert.

    ranks_per_node < world (several nodes): the throughput schedule's order across nodes. For
    each node in ascending order, its slots' float32 sum in slot order is rounded to the output
    dtype (the partial that crosses nodes); y is the float32 sum of the partials in node order,
    rounded. None or == world: one node, the flat sum above."""
    world = len(expert_outs)
    per_node = _ranks_per_node(ranks_per_node, world)
    local = num_experts // world
    hidden = expert_outs[0].size(-1)
    dtype = expert_outs[0].dtype
    outs = [e.cpu().reshape(-1, hidden) for e in expert_outs]
    ys = []
    for src in range(world):
        idx = topk_idxs[src].long().cpu()
        rows = token_rows[src].long().cpu()
        w = topk_weights[src].cpu().float()
        if per_node == world:
            y = _slot_sum(idx, rows, w, outs, range(world), local)
        else:
            y = torch.zeros(idx.size(0), hidden, dtype=torch.float32)
            for first in range(0, world, per_node):  # node by node, so in node order
                partial = _slot_sum(idx, rows, w, outs, range(first, first + per_node), local)
                # A token with no slot on this node adds +0.0, which leaves y's bits as they are
                # (y starts at +0.0, so it is never -0.0).
                y += partial.to(dtype).float()
        ys.append(y.to(dtype))
    return ys


def _ranks_per_node(ranks_per_node: Optional[int], world: int) -> int:
    if ranks_per_node is None:
        return world
    if (not isinstance(ranks_per_node, int) or isinstance(ranks_per_node, bool)
            or ranks_per_node <= 0 or world % ranks_per_node != 0):
        raise ValueError(f"ranks_per_node must be a positive int dividing the world size "
                         f"{world}, got ranks_per_node={ranks_per_node!r}")
    return ranks_per_node


def _slot_sum(idx, rows, w, outs, owners, local) -> torch.Tensor:
    """[N, hidden] float32: per token, the sum from 0 of w[n, k] * outs[owner][rows[n, k]] over
    its valid slots owned by one of owners, in slot order."""
    y = torch.zeros(idx.size(0), outs[0].size(1), dtype=torch.float32)
    for k in range(idx.size(1)):  # slot by slot, so the sum runs in slot order
        for owner in owners:
            mask = (idx[:, k] >= 0) & (idx[:, k] // local == owner)
            y[mask] += w[mask, k, None] * outs[owner][rows[mask, k]].float()
    return y


def low_latency_dispatch(
    xs, topk_idxs, topk_weights, num_experts, max_tokens_per_rank, x_scales=None
) -> tuple[list[RefLowLatencyDispatch], list[torch.Tensor]]:
    """The low-latency layout: expert j's rows packed at [j, 0:recv_counts[j]] of a
    [L, W * T, hidden] window, in the same (source, token, slot) order as dispatch().
    token_rows are flat rows j * W * T + slot."""
    flat, rows = dispatch(xs, topk_idxs, topk_weights, num_experts, x_scales)
    world = len(xs)
    local = num_experts // world
    per_expert = world * max_tokens_per_rank
    hidden = xs[0].size(1)
    out = []
    for d in flat:
        offs = d.expert_offsets.long()
        counts = offs[1:] - offs[:-1]
        recv_x = d.recv_x.new_zeros(local, per_expert, hidden)
        scales = None
        if d.recv_scales is not None:
            scales = d.recv_scales.new_zeros(local, per_expert, d.recv_scales.size(1))
        src = torch.zeros(local, per_expert, 2, dtype=torch.int32)
        weights = torch.zeros(local, per_expert)
        for j in range(local):
            a, b = int(offs[j]), int(offs[j + 1])
            recv_x[j, : b - a] = d.recv_x[a:b]
            if scales is not None:
                scales[j, : b - a] = d.recv_scales[a:b]
            src[j, : b - a] = d.recv_src[a:b]
            weights[j, : b - a] = d.recv_weights[a:b]
        out.append(RefLowLatencyDispatch(recv_x, scales, src, weights, counts.to(torch.int32)))
    ll_rows = []
    for s, r in enumerate(rows):
        idx = topk_idxs[s].long().cpu()
        flat_rows = r.clone()
        valid = idx >= 0
        owner = torch.where(valid, idx // local, 0)
        j = torch.where(valid, idx % local, 0)
        offs = torch.stack([flat[int(o)].expert_offsets[int(jj)] for o, jj in
                            zip(owner.flatten(), j.flatten())]).view(idx.shape) if idx.numel() \
            else torch.zeros_like(r)
        flat_rows[valid] = (j * per_expert + (r.long() - offs.long()))[valid].to(torch.int32)
        ll_rows.append(flat_rows)
    return out, ll_rows
