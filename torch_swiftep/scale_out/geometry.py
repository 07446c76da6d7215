"""One rank's place in a world of nodes, the symmetric buffers and signals both schedules across
nodes use (each named once here), and the index arithmetic they share."""
from __future__ import annotations

from typing import Optional

import torch

from ..fp8 import quantize_fp8 as _quantize
from ..ops.protocol import FP8_BLOCK
from .transport import Region

# Every put signals one of these (its own array per name, so a receiver can wait for exactly the
# puts it needs): the throughput schedule's (hierarchical.py), then the low-latency one's
# (low_latency.py).
SIGNALS = ("counts", "stage_x", "stage_scales", "stage_meta", "direct_x", "direct_scales",
           "direct_meta", "fwd_x", "fwd_scales", "fwd_meta", "comb_ready", "comb_w", "comb_rows",
           "partials",
           "ll_counts", "ll_x", "ll_scales", "ll_meta", "ll_comb")


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class Geometry:
    """Rank r = node * P + local; its peer on node m is m * P + local."""

    def __init__(self, config, rank: int, world: int, capacity: int):
        self.rank, self.world = rank, world
        self.P = config.ranks_per_node or world
        self.N = world // self.P
        self.node, self.local = rank // self.P, rank % self.P
        self.E, self.K, self.T = config.num_experts, config.num_topk, config.max_tokens_per_rank
        self.L, self.H, self.cap = self.E // world, config.hidden, capacity
        self.T_ll = config.ll_max_tokens_per_rank
        self.S_ll = world * self.T_ll  # low-latency rows per local expert
        self.dtype = config.dtype
        self.S = config.scale_cols if config.scale_cols % 4 == 0 else 0  # 16-byte scale rows
        self.M = _round_up(1 + 3 * self.K, 4)  # stage metadata: epoch, rows, experts, weights
        self.node_ranks = list(range(self.node * self.P, (self.node + 1) * self.P))
        self.column = [m * self.P + self.local for m in range(self.N)]  # my peer on each node
        self.remote_column = [p for p in self.column if p != rank]
        self.every = list(range(world))
        self._table = self._shapes()  # looked up by every put: built once

    def _shapes(self) -> dict:
        N, T, K, H, E4, K4 = self.N, self.T, self.K, self.H, _round_up(self.E, 4), \
            _round_up(self.K, 4)
        ll_rows = self.L * self.S_ll
        return {  # name: (rows, width, dtype); x-typed regions are viewed in x's dtype per call
            "counts": (self.world, E4, torch.int32), "counts_send": (1, E4, torch.int32),
            "stage_x": (N * T, H, self.dtype), "stage_scales": (N * T, self.S, torch.float32),
            "stage_meta": (N * T, self.M, torch.int32), "meta_send": (T, self.M, torch.int32),
            "recv_x": (self.cap, H, self.dtype),
            "recv_scales": (self.cap, self.S, torch.float32),
            "recv_meta": (self.cap, 4, torch.int32),  # (source, token, slot, weight bits)
            "comb_w": (N * T, K4, torch.float32), "w_send": (T, K4, torch.float32),
            "comb_rows": (N * T * K, H, self.dtype), "partials": (N * T, H, self.dtype),
            "partials_send": (N * T, H, self.dtype),
            "ll_counts": (self.world, E4, torch.int32), "ll_counts_send": (1, E4, torch.int32),
            "ll_recv_x": (ll_rows, H, self.dtype),
            "ll_recv_scales": (ll_rows, self.S, torch.float32),
            "ll_recv_meta": (ll_rows, 4, torch.int32),
            "ll_meta_send": (self.T_ll * K, 4, torch.int32),
            "ll_comb": (self.T_ll * K, H, self.dtype),
        }

    def region(self, name: str, dtype: Optional[torch.dtype] = None) -> Region:
        rows, width, default = self._table[name]
        return Region(name, rows, width, dtype or default)

    def buffer_bytes(self) -> dict[str, int]:
        return {name: rows * width * dtype.itemsize
                for name, (rows, width, dtype) in self._table.items()}


def put_counts(g: Geometry, t, idx: torch.Tensor, valid: torch.Tensor, prefix: str,
               epoch) -> None:
    """Puts this rank's per-expert counts (row `rank` of every rank's `{prefix}counts`),
    signalling `{prefix}counts`. No host sync."""
    dev = idx.device
    counts = torch.zeros(g.E + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, torch.where(valid, idx, g.E).flatten(),
                        torch.ones(idx.numel(), dtype=torch.int64, device=dev))
    send = t.buffer(g.region(f"{prefix}counts_send"))
    send.zero_()
    send[0, :g.E] = counts[:g.E].to(torch.int32)
    t.put(g.region(f"{prefix}counts"), send, torch.zeros(g.world, dtype=torch.long, device=dev),
          torch.full((g.world,), g.rank, dtype=torch.long, device=dev),
          torch.arange(g.world, device=dev), g.every, f"{prefix}counts", epoch)


def rank_in_expert(flat: torch.Tensor) -> torch.Tensor:
    """For each entry of flat (expert ids, row-major (token, slot)), how many earlier entries
    name the same expert: the (token, slot) order of the layout. No host sync."""
    order = torch.argsort(flat, stable=True)
    ordered = flat[order]
    rank_in = torch.empty_like(flat)
    rank_in[order] = torch.arange(flat.numel(), device=flat.device) - torch.searchsorted(
        ordered, ordered)
    return rank_in


def payload(g: Geometry, x: torch.Tensor, x_scales, quantize_fp8: bool) -> tuple:
    """(x, x_scales) as they travel: quantized here when asked (the torch recipe the one-node
    kernels reproduce); FP8 scale rows must be 16-byte multiples for the puts."""
    if quantize_fp8:
        x, x_scales = _quantize(x)
    if x_scales is not None and g.S == 0:
        raise ValueError(f"FP8 dispatch across nodes needs hidden a multiple of "
                         f"{4 * FP8_BLOCK} (16-byte scale rows), got hidden={g.H}")
    return x, x_scales
