"""The low-latency (decode) schedule across nodes: direct (docs/design.md, "Scale-out"). Every
(token, slot) goes straight from x into its row of the owner's low-latency window, whatever
node the owner is on; combine sends each row's output straight back to the token's rank, which
sums its slots in float32 in slot order (the flat contract: reference.combine with one node).

Static shapes and no host sync: every (token, slot) is an item of the put, a slot with no expert
has no destination (-1) and is never sent; the epoch lives on the device and is advanced by the
call itself, so a captured CUDA graph replays with fresh epochs. The counts exchange (every
rank's per-expert counts to every rank, for the deterministic (source, token, slot) order of the
window) is also what keeps a fast rank's next call out of a slow rank's buffers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .geometry import Geometry, payload, put_counts, rank_in_expert


class LowLatencyRoute(NamedTuple):
    """What one rank keeps from a low-latency dispatch for its combine (static shapes)."""

    owner_meta: torch.Tensor   # [L * S, 4] int32 of this rank's window rows: (source, token,
                               # slot, weight bits); rows past recv_counts[j] are stale
    recv_counts: torch.Tensor  # [L] int32
    valid: torch.Tensor        # [n, K] bool: this rank's slots that went somewhere


class LowLatencySchedule:
    def __init__(self, geometry: Geometry, transport, device):
        self.g, self.t = geometry, transport
        # the call counter the kernels read (uint64 bits; advanced on the device by each call)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)
        # topk_idx entries outside [-1, num_experts) seen by calls that were not checked on the
        # host (captured in a CUDA graph): they are sent nowhere, and check() reports them
        self.bad_index = torch.zeros(1, dtype=torch.int64, device=device)

    def dispatch(self, x, x_scales, topk_idx, topk_weights, quantize_fp8: bool = False):
        """Returns (recv_x [L, S, H], recv_scales or None, recv_src [L, S, 2], recv_weights
        [L, S], recv_counts [L] int32, token_rows [n, K] int32 (j * S + row), route)."""
        g, t = self.g, self.t
        x, x_scales = payload(g, x, x_scales, quantize_fp8)
        fp8 = x_scales is not None
        self.epoch += 1
        e, dev, n = self.epoch, x.device, x.size(0)
        idx = topk_idx.long()
        bad = (idx < -1) | (idx >= g.E)
        self.bad_index += bad.sum()
        valid = (idx >= 0) & ~bad
        put_counts(g, t, idx, valid, "ll_", e)
        t.wait("ll_counts", g.every, e)
        C = t.buffer(g.region("ll_counts"))[:, :g.E].long().clone()
        flat = torch.where(valid, idx, g.E).flatten()
        before_me = torch.zeros(g.E + 1, dtype=torch.long, device=dev)
        before_me[:g.E] = C[:g.rank].sum(0)
        rows = (flat % g.L) * g.S_ll + before_me[flat] + rank_in_expert(flat)
        token_rows = torch.where(valid, rows.view(n, g.K), -1).to(torch.int32)
        vflat = valid.flatten()
        dest = torch.where(vflat, flat // g.L, -1)
        drow = torch.where(vflat, rows, 0)
        tokens = torch.arange(n, device=dev).repeat_interleave(g.K)
        slots = torch.arange(g.K, device=dev).repeat(n)
        t.source(x)
        t.put(g.region("ll_recv_x", x.dtype), x, tokens, drow, dest, g.every, "ll_x", e)
        if fp8:
            t.source(x_scales)
            t.put(g.region("ll_recv_scales"), x_scales, tokens, drow, dest, g.every,
                  "ll_scales", e)
        bits = topk_weights.float().contiguous().view(torch.int32).flatten()
        meta = t.buffer(g.region("ll_meta_send"))[:n * g.K]  # symmetric: a put source anywhere
        meta.copy_(torch.stack([torch.full_like(tokens, g.rank), tokens, slots, bits.long()],
                               dim=1))
        t.put(g.region("ll_recv_meta"), meta, torch.arange(meta.size(0), device=dev), drow,
              dest, g.every, "ll_meta", e)
        for what in ("x", "scales", "meta") if fp8 else ("x", "meta"):
            t.wait(f"ll_{what}", g.every, e)
        counts = C[:, g.rank * g.L:(g.rank + 1) * g.L].sum(0).to(torch.int32)
        window = t.buffer(g.region("ll_recv_meta"))
        route = LowLatencyRoute(window.clone(), counts, valid)
        shape = (g.L, g.S_ll)
        meta3 = window.view(*shape, 4)
        return (t.buffer(g.region("ll_recv_x", x.dtype)).view(*shape, g.H),
                t.buffer(g.region("ll_recv_scales")).view(*shape, g.S) if fp8 else None,
                meta3[..., :2], meta3[..., 3].view(torch.float32), counts, token_rows, route)

    def combine(self, expert_out: torch.Tensor, route: LowLatencyRoute,
                topk_weights: torch.Tensor) -> torch.Tensor:
        """y [n, H] in expert_out's dtype; expert_out [L, S, H]."""
        g, t = self.g, self.t
        self.epoch += 1
        e, dev, dt, n = self.epoch, expert_out.device, expert_out.dtype, topk_weights.size(0)
        om = route.owner_meta.long()
        live = (torch.arange(g.S_ll, device=dev).unsqueeze(0)
                < route.recv_counts.unsqueeze(1)).flatten()
        rows = expert_out.reshape(g.L * g.S_ll, g.H)
        t.source(rows)  # the experts' own tensor: registered once per allocation
        t.put(g.region("ll_comb", dt), rows, torch.arange(rows.size(0), device=dev),
              torch.where(live, om[:, 1] * g.K + om[:, 2], 0), torch.where(live, om[:, 0], -1),
              g.every, "ll_comb", e)
        t.wait("ll_comb", g.every, e)
        back = t.buffer(g.region("ll_comb", dt)).view(g.T_ll, g.K, g.H)[:n]
        w = topk_weights.float()
        y = torch.zeros(n, g.H, dtype=torch.float32, device=dev)
        for k in range(g.K):  # slot order; a slot with no expert adds +0.0 (y is never -0.0)
            term = w[:, k, None] * back[:, k].float()
            y += torch.where(route.valid[:, k, None], term, 0.0)
        return y.to(dt)
