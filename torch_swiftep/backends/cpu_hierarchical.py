"""The throughput schedule across nodes on the CPU backend: the bookkeeping the scale-out
kernels will do over RDMA, proven here over gloo (docs/design.md, "Scale-out").

Ranks are grouped into nodes of ranks_per_node. A rank's "peer" on node n is the rank with its
local index there: forwarder(n) = n * ranks_per_node + rank % ranks_per_node.

Dispatch: one payload row per (token, destination node) goes to that node's forwarder, with the
metadata of every (token, slot) pair the node owns (row, weight, owner); the forwarder sends the
row on to each owner in its node (one load, several stores on a GPU). Rows land where the flat
schedule puts them: the layout is the same pure function of the routing.

Combine mirrors it: each owner sends its rows' outputs to the forwarder on its node that serves
their source, the forwarder reduces a token's slots on that node in float32 in slot order (with
the weights the source sends at combine time) and rounds the sum to the output dtype, and that
one partial row per (token, node) crosses back; the source adds its nodes' partials in float32 in
node order. The partial crosses in the output dtype, not float32, so a bf16 combine moves half
the bytes (float32 partials would double them and undo the hierarchy's saving). The result is
reference.combine(..., ranks_per_node=P) bit for bit: that order is the contract.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..ops.protocol import num_local_experts, plan_value


def _counts_in(counts: torch.Tensor, group) -> torch.Tensor:
    """What every rank sends me, from what I send every rank (an all-to-all of counts)."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def _exchange(rows: torch.Tensor, dest: torch.Tensor, world: int, group) -> tuple:
    """Send rows[i] to rank dest[i] (rows must be grouped by dest, ascending); returns (what
    arrived, grouped by source rank, and the source of each arrived row)."""
    counts = torch.bincount(dest, minlength=world)
    counts_in = _counts_in(counts, group)
    width = rows.size(1)
    raw = rows.contiguous().view(torch.uint8)
    out = raw.new_empty(int(counts_in.sum()), raw.size(1))
    dist.all_to_all_single(out, raw, counts_in.tolist(), counts.tolist(), group=group)
    sources = torch.repeat_interleave(torch.arange(world), counts_in)
    return out.view(rows.dtype).view(-1, width), sources


def _nodes(plan) -> tuple[int, int, int]:
    return (plan_value(plan, "rank"), plan_value(plan, "world_size"),
            plan_value(plan, "ranks_per_node"))


def dispatch_exchange(payload: torch.Tensor, route, topk_weights: torch.Tensor, plan, group):
    """Moves payload rows (one per token, uint8) to the owners of their pairs through the
    destination nodes' forwarders. Returns (payload rows, meta [token, row, weight bits],
    source rank) of every pair this rank owns, as the flat exchange does."""
    rank, world, per_node = _nodes(plan)
    order = route.order  # pairs grouped by owner, then row: so also by node and forwarder
    tokens, slots = route.tokens[order], route.slots[order]
    owners, rows = route.owner[order], route.rows[order]
    weight_bits = topk_weights[tokens, slots].view(torch.int32).long()
    forwarders = owners // per_node * per_node + rank % per_node
    # stage 1, across nodes: one row per (forwarder, token)
    span = int(tokens.max()) + 1 if tokens.numel() else 1
    unique, inverse = torch.unique(forwarders * span + tokens, return_inverse=True)
    first_of = torch.bincount(unique // span, minlength=world).cumsum(0)
    first_of = first_of - torch.bincount(unique // span, minlength=world)
    index_in_block = inverse - first_of[forwarders]
    rows1, sources1 = _exchange(payload[unique % span], unique // span, world, group)
    meta1 = torch.stack([index_in_block, rows, weight_bits, tokens, owners], dim=1)
    pair_meta, pair_sources = _exchange(meta1, forwarders, world, group)
    # stage 2, inside the node: the forwarder sends each pair's row to its owner
    block_start = torch.zeros(world, dtype=torch.long)
    block_start[1:] = torch.bincount(sources1, minlength=world).cumsum(0)[:-1]
    row_index = block_start[pair_sources] + pair_meta[:, 0]
    by_owner = torch.argsort(pair_meta[:, 4], stable=True)
    meta2 = torch.stack([pair_meta[:, 3], pair_meta[:, 1], pair_meta[:, 2], pair_sources], dim=1)
    recv_rows, _ = _exchange(rows1[row_index[by_owner]], pair_meta[by_owner, 4], world, group)
    recv_meta, _ = _exchange(meta2[by_owner], pair_meta[by_owner, 4], world, group)
    return recv_rows, recv_meta[:, :3], recv_meta[:, 3]


def combine_exchange(window: torch.Tensor, valid_rows: torch.Tensor, row_sources: torch.Tensor,
                     topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                     token_rows: torch.Tensor, plan, group,
                     sent_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [num_tokens, hidden] float32 of this rank's tokens: window (this rank's combine rows),
    reduced per node at the forwarders, one partial per (token, node) back to the source.
    sent_weights: combine_partials (every rank its own node, so each forwarder is the owner):
    the weights dispatch sent with each row (this rank's recv_weights, by row) instead of the
    ones the source sends now, as the CUDA kernels do."""
    rank, world, per_node = _nodes(plan)
    if sent_weights is not None:
        per_node = 1
    local, span_rows = num_local_experts(plan), window.size(0) + 1
    # A. source -> forwarders: the pairs to reduce there, with this call's weights
    idx = topk_idx.long()
    tokens, slots = (idx >= 0).nonzero(as_tuple=True)
    owners, rows = idx[tokens, slots] // local, token_rows[tokens, slots].long()
    order = torch.argsort(owners * span_rows + rows, stable=True)
    forwarders = (owners // per_node * per_node + rank % per_node)[order]
    weight_bits = topk_weights[tokens, slots].view(torch.int32).long()
    meta_a = torch.stack([tokens, slots, weight_bits, rows, owners], dim=1)[order]
    pairs, pair_sources = _exchange(meta_a, forwarders, world, group)
    # B. owners -> forwarders (inside the node): every valid row's output
    to_forwarder = rank // per_node * per_node + row_sources % per_node
    by_forwarder = torch.argsort(to_forwarder, stable=True)
    outs, out_owners = _exchange(window[valid_rows[by_forwarder]], to_forwarder[by_forwarder],
                                 world, group)
    out_rows, _ = _exchange(valid_rows[by_forwarder].unsqueeze(1), to_forwarder[by_forwarder],
                            world, group)
    # C. forwarder: each pair's output, reduced per (source, token) in slot order, in float32,
    # then rounded to the output dtype: the partial crosses nodes in that dtype
    keys, positions = torch.sort(out_owners * span_rows + out_rows[:, 0])
    found = positions[torch.searchsorted(keys, pairs[:, 4] * span_rows + pairs[:, 3])]
    span_tokens = int(pairs[:, 0].max()) + 1 if pairs.numel() else 1
    group_keys, group_of = torch.unique(pair_sources * span_tokens + pairs[:, 0],
                                        return_inverse=True)
    weights = (pairs[:, 2].to(torch.int32).view(torch.float32) if sent_weights is None
               else sent_weights[pairs[:, 3]]).unsqueeze(1)
    partial = _in_order(group_keys.numel(), group_of, pairs[:, 1], outs[found].float() * weights)
    # D. forwarder -> sources (across nodes): one partial row per (token, node)
    back, forwarders = _exchange(partial.to(window.dtype), group_keys // span_tokens, world,
                                 group)
    back_tokens, _ = _exchange((group_keys % span_tokens).unsqueeze(1), group_keys // span_tokens,
                               world, group)
    # Arrivals are grouped by forwarder, and forwarder(n) grows with n: so by node, ascending.
    return _in_order(idx.size(0), back_tokens[:, 0], forwarders, back.float())


def _in_order(num_out: int, out_index: torch.Tensor, step: torch.Tensor,
              values: torch.Tensor) -> torch.Tensor:
    """[num_out, hidden] float32: out[i] = the sum from 0 of values[j] with out_index[j] == i,
    in ascending step[j] (each (out_index, step) at most once). One index_add_ per step, each
    with distinct indices, so the order is exact whatever index_add_'s own order is."""
    out = torch.zeros(num_out, values.size(1), dtype=torch.float32)
    for s in torch.unique(step).tolist():
        this = step == s
        out.index_add_(0, out_index[this], values[this])
    return out


def cross_node_rows(topk_idx_per_rank, num_experts: int, ranks_per_node: int) -> dict:
    """Rows that cross node boundaries in one dispatch of the whole world: hierarchical (one per
    (token, destination node)) against flat (one per (token, destination rank)), and messages
    per node pair. For the benchmark's report; pure arithmetic on the routing."""
    world = len(topk_idx_per_rank)
    local, nodes = num_experts // world, world // ranks_per_node
    hierarchical = flat = 0
    per_node_pair: dict = {}
    for source, idx in enumerate(topk_idx_per_rank):
        idx = idx.long()
        owner = torch.where(idx >= 0, idx // local, world)  # world: no expert
        to_rank = torch.zeros(idx.size(0), world + 1, dtype=torch.bool)
        to_rank.scatter_(1, owner, True)
        to_rank = to_rank[:, :world]
        to_node = to_rank.view(-1, nodes, ranks_per_node).any(dim=2)
        src_node = source // ranks_per_node
        away = torch.ones(world, dtype=torch.bool)
        away[src_node * ranks_per_node:(src_node + 1) * ranks_per_node] = False
        flat += int(to_rank[:, away].sum())
        for node in range(nodes):
            if node != src_node:
                rows = int(to_node[:, node].sum())
                hierarchical += rows
                per_node_pair[(src_node, node)] = per_node_pair.get((src_node, node), 0) + rows
    return {"hierarchical_rows": hierarchical, "flat_rows": flat,
            "rows_per_node_pair": per_node_pair}
