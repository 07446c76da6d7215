"""The throughput schedule across nodes, on a put-with-signal transport (docs/design.md,
"Scale-out"). Rank r = node * P + local; its peer on node m is m * P + local (the "forwarder"
of r's tokens there, and r is the forwarder of its peers' tokens on r's node).

Dispatch (epoch e):
1. counts: every rank puts its [E] per-expert counts to every rank; all wait for all. Every
   rank then computes every row of the flat layout itself (no rank is special), and this
   exchange is also what keeps a fast rank from overwriting a slow one's stage buffers.
2. direct: pairs owned inside the node go straight from x into the owner's final row.
3. stage: for each other node, one row per token with a slot there goes to the forwarder on that
   node (straight from x, registered), with one metadata row (its K final rows, experts and
   weights, tagged with e).
4. forward: the forwarder puts each staged row into the final rows of the owners in its node.
Combine (epoch e), the reverse, in the contract's order (reference.combine(ranks_per_node=P)):
0. every forwarder tells its node's owners that its combine rows are free (the last combine's
   reduction is done); 1. sources put this call's weights of their staged tokens to the remote
   forwarders; 2. owners put each row's output into the forwarder that serves its source, at
   (source node, token, slot); 3. the forwarder reduces each (source, token)'s slots on its node
   in float32 in slot order, rounds to the output dtype and puts that one partial row back;
   4. the source adds its nodes' partials in float32 in node order and rounds.

Each put signals every rank it may write (also with no rows), so every wait is on a fixed set of
ranks. The schedule syncs the host where sizes depend on the routing (after the counts and the
forwarder's metadata), as a normal-mode internode dispatch does; it is not CUDA-graph capturable.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..status import SwiftepError, rank_name
from .geometry import Geometry, payload, put_counts, rank_in_expert


class Route(NamedTuple):
    """What one rank keeps from a dispatch for its combine (the buffers are reused by the next
    dispatch, this is not)."""

    stage_tokens: torch.Tensor   # [S] tokens this rank staged to remote forwarders
    stage_nodes: torch.Tensor    # [S] their destination nodes
    own_tokens: torch.Tensor     # [D] (token, slot) pairs of this rank owned in its node
    own_slots: torch.Tensor
    fwd_stage_rows: torch.Tensor  # [F] forwarded pairs: stage row (source node * T + token)
    fwd_slots: torch.Tensor       # [F] and slot
    owner_meta: torch.Tensor      # [R, 4] int32 of this rank's rows: (source, token, slot, w)
    token_nodes: torch.Tensor     # [n, N] bool: token has a slot on node m


class HierarchicalSchedule:
    """One rank's side of the schedule over `transport` (scale_out/transport.py)."""

    def __init__(self, geometry: Geometry, transport, about_rank=None):
        self.g, self.t, self.about_rank = geometry, transport, about_rank
        self.dispatch_epoch = 0
        self.combine_epoch = 0

    def _put(self, name, src, src_rows, dst_rows, dest, targets, signal, epoch, dtype=None):
        self.t.put(self.g.region(name, dtype), src, src_rows, dst_rows, dest, targets, signal,
                   epoch)

    def _check(self):
        self.t.check(self.about_rank)

    # ------------------------------------------------------------------------ dispatch
    def dispatch(self, x, x_scales, topk_idx, topk_weights, quantize_fp8: bool = False):
        """Returns (expert_offsets [L + 1] int32, token_rows [n, K] int32, recv_x, recv_scales,
        recv_src [cap, 2] int32, recv_weights [cap] float32, Route)."""
        g, t = self.g, self.t
        x, x_scales = payload(g, x, x_scales, quantize_fp8)
        fp8 = x_scales is not None
        self.dispatch_epoch += 1
        e = self.dispatch_epoch
        dev, n = x.device, x.size(0)
        idx = topk_idx.long()
        valid = idx >= 0
        owner = torch.where(valid, idx // g.L, -1)
        C = self._exchange_counts(idx, valid, e)  # 1.
        per_owner = C.sum(0).view(g.world, g.L)
        need = per_owner.sum(1).tolist()
        for o, rows in enumerate(need):  # every rank sees the same counts: all raise alike
            if rows > g.cap:
                raise SwiftepError(
                    f"{rank_name(g.rank, g.P, g.world)}: capacity overflow: "
                    f"{rank_name(o, g.P, g.world)} would receive {rows} rows, more than "
                    f"capacity={g.cap}; nothing was sent. Build the Communicator with a larger "
                    "capacity")
        token_rows = self._token_rows(idx, valid, C, per_owner)
        offsets = torch.zeros(g.L + 1, dtype=torch.int32, device=dev)
        offsets[1:] = per_owner[g.rank].cumsum(0).to(torch.int32)
        weight_bits = topk_weights.float().contiguous().view(torch.int32)
        xdt = x.dtype
        # 2. direct: pairs owned in this node, x row -> final row
        own_t, own_k = (valid & (owner // g.P == g.node)).nonzero(as_tuple=True)
        dest, drow = owner[own_t, own_k], token_rows[own_t, own_k].long()
        meta = torch.stack([torch.full_like(own_t, g.rank), own_t, own_k,
                            weight_bits[own_t, own_k].long()], dim=1).to(torch.int32)
        self._put("recv_x", x, own_t, drow, dest, g.node_ranks, "direct_x", e, xdt)
        if fp8:
            self._put("recv_scales", x_scales, own_t, drow, dest, g.node_ranks, "direct_scales", e)
        self._put("recv_meta", meta, torch.arange(meta.size(0), device=dev), drow, dest,
                  g.node_ranks, "direct_meta", e)
        # 3. stage: one row per (token, other node) to my peer there, with its metadata
        token_nodes = torch.zeros(n, g.N + 1, dtype=torch.bool, device=dev)
        token_nodes.scatter_(1, torch.where(valid, owner // g.P, g.N), True)
        token_nodes = token_nodes[:, :g.N]
        remote = token_nodes.clone()
        remote[:, g.node] = False
        st_t, st_m = remote.nonzero(as_tuple=True)
        fwd, stage_row = st_m * g.P + g.local, g.node * g.T + st_t
        t.source(x)
        self._put("stage_x", x, st_t, stage_row, fwd, g.remote_column, "stage_x", e, xdt)
        if fp8:
            t.source(x_scales)
            self._put("stage_scales", x_scales, st_t, stage_row, fwd, g.remote_column,
                      "stage_scales", e)
        meta_send = t.buffer(g.region("meta_send"))
        meta_send[:n, 0] = e
        meta_send[:n, 1:1 + g.K] = token_rows
        meta_send[:n, 1 + g.K:1 + 2 * g.K] = idx.to(torch.int32)
        meta_send[:n, 1 + 2 * g.K:1 + 3 * g.K] = weight_bits
        self._put("stage_meta", meta_send, st_t, stage_row, fwd, g.remote_column, "stage_meta", e)
        # 4. forward what my peers on other nodes staged here
        fwd_rows, fwd_slots = self._forward(e, fp8, xdt)
        for name in ("direct", "fwd"):
            for what in ("x", "scales", "meta") if fp8 else ("x", "meta"):
                t.wait(f"{name}_{what}", g.node_ranks, e)
        self._check()
        r = need[g.rank]
        owner_meta = t.buffer(g.region("recv_meta"))[:r].clone()
        route = Route(st_t, st_m, own_t, own_k, fwd_rows, fwd_slots, owner_meta, token_nodes)
        recv_meta = t.buffer(g.region("recv_meta"))
        return (offsets, token_rows, t.buffer(g.region("recv_x", xdt)),
                t.buffer(g.region("recv_scales")) if fp8 else None, recv_meta[:, :2],
                recv_meta[:, 3].view(torch.float32), route)

    def _exchange_counts(self, idx, valid, e) -> torch.Tensor:
        """Step 1: every rank's per-expert counts, [W, E] int64 (a copy, taken before this rank
        puts anything: no rank can start the next call's puts before that)."""
        g, t = self.g, self.t
        put_counts(g, t, idx, valid, "", e)
        t.wait("counts", g.every, e)
        self._check()
        return t.buffer(g.region("counts"))[:, :g.E].long().clone()

    def _token_rows(self, idx, valid, C, per_owner):
        """[n, K] int32 final rows, the flat layout's: expert e's rows start after the owner's
        earlier experts, then after lower source ranks; within a source, (token, slot) order."""
        g = self.g
        dev = idx.device
        expert_start = torch.zeros(g.E + 1, dtype=torch.long, device=dev)
        expert_start[:g.E] = (per_owner.cumsum(1) - per_owner).flatten()
        expert_start[:g.E] += C[:g.rank].sum(0)
        flat = torch.where(valid, idx, g.E).flatten()
        rows = (expert_start[flat] + rank_in_expert(flat)).view(idx.shape)
        return torch.where(valid, rows, -1).to(torch.int32)

    def _forward(self, e, fp8, xdt):
        """Step 4; returns the forwarded pairs (stage row, slot) for the combine."""
        g, t = self.g, self.t
        for what in ("x", "scales", "meta") if fp8 else ("x", "meta"):
            t.wait(f"stage_{what}", g.remote_column, e)
        self._check()
        stage = t.buffer(g.region("stage_meta"))
        stage_rows = (stage[:, 0] == e).nonzero()[:, 0]  # tagged with this call: fresh
        rows = stage[stage_rows, 1:1 + g.K].long()
        idx = stage[stage_rows, 1 + g.K:1 + 2 * g.K].long()
        w_bits = stage[stage_rows, 1 + 2 * g.K:1 + 3 * g.K]
        mine = (idx >= 0) & (idx // g.L // g.P == g.node)
        fi, fk = mine.nonzero(as_tuple=True)
        srow = stage_rows[fi]
        dest, drow = idx[fi, fk] // g.L, rows[fi, fk]
        source = (srow // g.T) * g.P + g.local
        meta = torch.stack([source, srow % g.T, fk, w_bits[fi, fk].long()], dim=1).to(torch.int32)
        self._put("recv_x", t.buffer(g.region("stage_x", xdt)), srow, drow, dest, g.node_ranks,
                  "fwd_x", e, xdt)
        if fp8:
            self._put("recv_scales", t.buffer(g.region("stage_scales")), srow, drow, dest,
                      g.node_ranks, "fwd_scales", e)
        self._put("recv_meta", meta, torch.arange(meta.size(0), device=meta.device), drow, dest,
                  g.node_ranks, "fwd_meta", e)
        return srow, fk

    # ------------------------------------------------------------------------- combine
    def combine(self, expert_out: torch.Tensor, route: Route, topk_weights: torch.Tensor):
        """y [n, hidden] in expert_out's dtype: reference.combine(..., ranks_per_node=P)."""
        g, t = self.g, self.t
        self.combine_epoch += 1
        e = self.combine_epoch
        dev, dt, n = expert_out.device, expert_out.dtype, topk_weights.size(0)
        nothing = torch.zeros(0, dtype=torch.long, device=dev)
        # 0. my combine rows are free (my last reduction is done): tell my node's owners
        self._put("comb_rows", expert_out[:0], nothing, nothing, nothing, g.node_ranks,
                  "comb_ready", e, dt)
        # 1. this call's weights of my staged tokens, to my peers on other nodes
        w_send = t.buffer(g.region("w_send"))
        w_send[:n, :g.K] = topk_weights.float()
        st_t = route.stage_tokens
        self._put("comb_w", w_send, st_t, g.node * g.T + st_t, route.stage_nodes * g.P + g.local,
                  g.remote_column, "comb_w", e)
        # 2. my rows' outputs to the forwarders serving their sources, at (node, token, slot)
        t.wait("comb_ready", g.node_ranks, e)
        om = route.owner_meta.long()
        src, tok, slot = om[:, 0], om[:, 1], om[:, 2]
        self._put("comb_rows", expert_out, torch.arange(om.size(0), device=dev),
                  ((src // g.P) * g.T + tok) * g.K + slot, g.node * g.P + src % g.P,
                  g.node_ranks, "comb_rows", e, dt)
        # 3. reduce each (source, token)'s slots on my node, in slot order; one partial back
        t.wait("comb_w", g.remote_column, e)
        t.wait("comb_rows", g.node_ranks, e)
        self._check()
        comb_w = t.buffer(g.region("comb_w"))
        keys = torch.cat([g.node * g.T + route.own_tokens, route.fwd_stage_rows])
        slots = torch.cat([route.own_slots, route.fwd_slots])
        weights = torch.cat([topk_weights.float()[route.own_tokens, route.own_slots],
                             comb_w[route.fwd_stage_rows, route.fwd_slots]])
        rows = t.buffer(g.region("comb_rows", dt))[keys * g.K + slots].float()
        values = weights.unsqueeze(1) * rows
        groups, group_of = torch.unique(keys, return_inverse=True)
        partial = torch.zeros(groups.numel(), g.H, dtype=torch.float32, device=dev)
        for k in range(g.K):  # slot by slot: each (source, token) once per add, in slot order
            sel = slots == k
            partial.index_add_(0, group_of[sel], values[sel])
        send = t.buffer(g.region("partials_send", dt))
        send[:groups.numel()] = partial.to(dt)
        self._put("partials", send, torch.arange(groups.numel(), device=dev),
                  g.node * g.T + groups % g.T, (groups // g.T) * g.P + g.local, g.column,
                  "partials", e, dt)
        # 4. the partials of my tokens, in node order
        t.wait("partials", g.column, e)
        self._check()
        partials = t.buffer(g.region("partials", dt))
        y = torch.zeros(n, g.H, dtype=torch.float32, device=dev)
        for m in range(g.N):
            tokens = route.token_nodes[:, m].nonzero()[:, 0]
            y[tokens] += partials[m * g.T + tokens].float()
        return y.to(dt)
