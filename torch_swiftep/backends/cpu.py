"""CPU backend: the ops run for real across a torch.distributed (gloo) group.

Each rank computes its rows' destinations from an all-gather of per-expert counts (the same
prefix sums the CUDA layout kernel does), then one all_to_all_single moves the payload and one
moves (token, row, weight) so the owner can place every row. Combine sends each row back to its
source, which knows the order of what it will receive (its own rows sorted by row index), so no
index travels back.

Arguments were checked by the op's contract (ops/) in the Python wrapper; like the CUDA
kernels, this backend checks only what needs the data: index values and capacity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..fp8 import quantize_fp8
from ..ops.combine_symmetric import check_segment_table
from ..ops.protocol import (
    EPOCH_CAPACITY,
    EPOCH_SLOTS,
    ll_rows_per_expert,
    num_local_experts,
    plan_value,
)
from ..plan import ctrl_region, typed_region
from ..status import SwiftepError, SwiftepIndexError
from .cpu_hierarchical import combine_exchange, dispatch_exchange


def _group(group_name: str, world_size: int):
    if world_size == 1:
        return None
    if not group_name:
        raise ValueError(f"group_name is empty but world_size={world_size}: the CPU backend "
                         "needs the process group")
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _all_gather_counts(counts: torch.Tensor, world_size: int, group) -> torch.Tensor:
    if group is None:
        return counts.unsqueeze(0)
    out = [torch.empty_like(counts) for _ in range(world_size)]
    dist.all_gather(out, counts, group=group)
    return torch.stack(out)


def _all_to_all(send: torch.Tensor, send_counts, recv_counts, group) -> torch.Tensor:
    """Uneven all-to-all of the rows of a 2-D tensor (any dtype: moved as bytes)."""
    if group is None:
        return send.clone()
    width = send.size(1)
    raw = send.contiguous().view(torch.uint8)
    out = raw.new_empty(int(sum(recv_counts)), raw.size(1))
    dist.all_to_all_single(out, raw, [int(c) for c in recv_counts],
                           [int(c) for c in send_counts], group=group)
    return out.view(send.dtype).view(-1, width)


def check_index_values(topk_idx: torch.Tensor, num_experts: int) -> None:
    """Every entry is -1 or in [0, num_experts) (the CUDA kernels report the same)."""
    if topk_idx.numel() == 0:
        return
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        n, k = (int(v) for v in bad.nonzero()[0])
        raise SwiftepIndexError(
            f"topk_idx[{n}, {k}] = {int(topk_idx[n, k])} is out of range: entries must be -1 "
            f"(no expert) or in [0, num_experts={num_experts})")


def dispatch_layout(topk_idx, num_experts, world_size):
    check_index_values(topk_idx, num_experts)
    idx = topk_idx.long()
    valid = idx >= 0
    per_expert = torch.bincount(idx[valid], minlength=num_experts).to(torch.int32)
    local = num_experts // world_size
    owner = torch.where(valid, idx // local, world_size)  # world_size = "nowhere"
    in_rank = torch.zeros(idx.size(0), world_size + 1, dtype=torch.bool)
    in_rank.scatter_(1, owner, True)
    in_rank = in_rank[:, :world_size].contiguous()
    return in_rank.sum(0).to(torch.int32), per_expert, in_rank


class _Route:
    """Where every (token, slot) of this rank goes. Entries are listed in `order`: grouped by
    owner rank, then by destination row (i.e. by expert, then token, then slot)."""

    def __init__(self, topk_idx, plan, low_latency: bool, group):
        rank, world = plan_value(plan, "rank"), plan_value(plan, "world_size")
        experts_total = plan_value(plan, "num_experts")
        local = experts_total // world
        idx = topk_idx.long()
        self.tokens, self.slots = (idx >= 0).nonzero(as_tuple=True)  # (token, slot) order
        experts = idx[self.tokens, self.slots]
        counts = torch.bincount(experts, minlength=experts_total).to(torch.int32)
        all_counts = _all_gather_counts(counts, world, group).long()  # [W, E]
        totals = all_counts.sum(0)  # rows per expert over all sources
        if low_latency:
            per_expert = world * plan_value(plan, "ll_max_tokens_per_rank")
            worst = int(totals.max()) if totals.numel() else 0
            if worst > per_expert:
                e = int(totals.argmax())
                raise SwiftepError(
                    f"low-latency window overflow: expert {e} (rank {e // local}) receives "
                    f"{worst} rows, more than world_size * ll_max_tokens_per_rank = {per_expert}")
            expert_base = (torch.arange(experts_total) % local) * per_expert
        else:
            capacity = plan_value(plan, "capacity")
            per_owner = totals.view(world, local)
            rows_needed = per_owner.sum(1)
            if bool((rows_needed > capacity).any()):
                d = int(rows_needed.argmax())
                raise SwiftepError(
                    f"capacity overflow: rank {d} receives {int(rows_needed[d])} rows, more than "
                    f"capacity={capacity}; build the Communicator with a larger capacity")
            expert_base = (per_owner.cumsum(1) - per_owner).flatten()
        self.expert_offsets = torch.cat(
            [torch.zeros(1, dtype=torch.long), totals.view(world, local)[rank].cumsum(0)]
        ).to(torch.int32)
        self.recv_counts = totals.view(world, local)[rank].to(torch.int32)
        before_me = all_counts[:rank].sum(0)
        self.order = torch.argsort(experts, stable=True)
        sorted_experts = experts[self.order]
        local_start = counts.long().cumsum(0) - counts.long()
        rank_in_expert = torch.empty_like(experts)
        rank_in_expert[self.order] = torch.arange(experts.numel()) - local_start[sorted_experts]
        self.rows = expert_base[experts] + before_me[experts] + rank_in_expert
        self.send_counts = counts.long().view(world, local).sum(1)
        self.recv_counts_from = all_counts[:, rank * local:(rank + 1) * local].sum(1)
        self.owner = experts // local
        self.token_rows = torch.full(idx.shape, -1, dtype=torch.int32)
        self.token_rows[self.tokens, self.slots] = self.rows.to(torch.int32)


def _dispatch(x, x_scales, topk_idx, topk_weights, workspace, group_name, plan, low_latency):
    world, experts = plan_value(plan, "world_size"), plan_value(plan, "num_experts")
    check_index_values(topk_idx, experts)
    group = _group(group_name, world)
    route = _Route(topk_idx, plan, low_latency, group)
    per_token = [x.view(torch.uint8)] + ([x_scales.view(torch.uint8)] if x_scales is not None
                                         else [])
    payload = torch.cat(per_token, dim=1)  # what one token sends: its row (and scales)
    if _hierarchical(plan, low_latency):
        recv_payload, recv_meta, sources = dispatch_exchange(payload, route, topk_weights, plan,
                                                             group)
    else:
        recv_payload, recv_meta, sources = _flat_exchange(payload, route, topk_weights, group,
                                                          world)
    prefix = "off_ll_" if low_latency else "off_"
    rows_total = _window_rows(plan, low_latency)
    hidden = plan_value(plan, "hidden")
    rows = recv_meta[:, 1]
    x_bytes = hidden * x.element_size()
    window = typed_region(workspace, plan, prefix + "recv_x", torch.uint8, (rows_total, x_bytes))
    window[rows] = recv_payload[:, :x_bytes]
    if x_scales is not None:
        cols = x_scales.size(1)
        scales = typed_region(workspace, plan, prefix + "recv_scales", torch.float32,
                              (rows_total, cols))
        scales[rows] = recv_payload[:, x_bytes:].contiguous().view(torch.float32)
    src = typed_region(workspace, plan, prefix + "recv_src", torch.int32, (rows_total, 2))
    src[rows] = torch.stack([sources, recv_meta[:, 0]], dim=1).to(torch.int32)
    weights = typed_region(workspace, plan, prefix + "recv_weights", torch.float32, (rows_total,))
    weights[rows] = recv_meta[:, 2].to(torch.int32).view(torch.float32)
    _bump_epoch(workspace, plan, low_latency)
    return route


def _hierarchical(plan, low_latency: bool) -> bool:
    """Several nodes, throughput schedule: tokens cross nodes once per node (the low-latency
    schedule writes every (token, rank) directly, across nodes too)."""
    return not low_latency and plan_value(plan, "ranks_per_node") < plan_value(plan, "world_size")


def _flat_exchange(payload, route, topk_weights, group, world):
    """One all-to-all of every pair's row: (rows, meta [token, row, weight bits], sources)."""
    order = route.order
    tokens, slots = route.tokens[order], route.slots[order]
    meta = torch.stack([
        tokens,
        route.rows[order],
        topk_weights[tokens, slots].view(torch.int32).long(),  # float bits travel as int
    ], dim=1)
    send_counts, recv_counts = route.send_counts.tolist(), route.recv_counts_from.tolist()
    recv_payload = _all_to_all(payload[tokens], send_counts, recv_counts, group)
    recv_meta = _all_to_all(meta, send_counts, recv_counts, group)
    return recv_payload, recv_meta, torch.repeat_interleave(torch.arange(world),
                                                            route.recv_counts_from)


def _window_rows(plan, low_latency: bool) -> int:
    if not low_latency:
        return plan_value(plan, "capacity")
    return num_local_experts(plan) * ll_rows_per_expert(plan)


def _bump_epoch(workspace, plan, low_latency: bool) -> None:
    # Same bookkeeping as the CUDA kernels, so a workspace's epoch counts calls on any backend.
    epoch = ctrl_region(workspace, plan, "epoch", torch.int64, (EPOCH_CAPACITY,))
    epoch[EPOCH_SLOTS.index("low_latency" if low_latency else "throughput")] += 1


def _combine(expert_out, topk_idx, topk_weights, token_rows, valid_rows, workspace, group_name,
             plan, low_latency):
    world, experts = plan_value(plan, "world_size"), plan_value(plan, "num_experts")
    local = experts // world
    group = _group(group_name, world)
    hidden = plan_value(plan, "hidden")
    rows_total = _window_rows(plan, low_latency)
    prefix = "off_ll_" if low_latency else "off_"
    window = typed_region(workspace, plan, prefix + "combine_x", expert_out.dtype,
                          (rows_total, hidden))
    flat_out = expert_out.reshape(-1, hidden)
    if flat_out.data_ptr() != window.data_ptr():
        window[valid_rows] = flat_out[valid_rows]  # not the combine window: stage it there
    src = typed_region(workspace, plan, prefix + "recv_src", torch.int32, (rows_total, 2))
    row_src = src[valid_rows, 0].long()
    partials = not low_latency and bool(plan_value(plan, "combine_partials"))
    if _hierarchical(plan, low_latency) or partials:
        # combine_partials: the same bookkeeping with every rank its own node (one partial per
        # (token, owner rank)), reduced with the weights dispatch sent (recv_weights)
        sent = (typed_region(workspace, plan, "off_recv_weights", torch.float32, (rows_total,))
                if partials else None)
        y = combine_exchange(window, valid_rows, row_src, topk_idx, topk_weights, token_rows,
                             plan, group, sent_weights=sent)
        return y.to(expert_out.dtype)
    back_order = torch.argsort(row_src, stable=True)  # rows per source, ascending row index
    send = window[valid_rows[back_order]]
    send_counts = torch.bincount(row_src, minlength=world)

    idx = topk_idx.long()
    tokens, slots = (idx >= 0).nonzero(as_tuple=True)
    owner = idx[tokens, slots] // local
    rows = token_rows[tokens, slots].long()
    mine = torch.argsort(owner * (rows_total + 1) + rows, stable=True)  # (owner, row) order
    recv_counts = torch.bincount(owner, minlength=world)
    received = _all_to_all(send, send_counts.tolist(), recv_counts.tolist(), group)
    y = torch.zeros(idx.size(0), hidden, dtype=torch.float32)
    weights = topk_weights[tokens[mine], slots[mine]].unsqueeze(1)
    y.index_add_(0, tokens[mine], received.float() * weights)
    return y.to(expert_out.dtype)


def _quantized(x, x_scales, quantize):
    """The ops' quantize_fp8=True: the same bytes the CUDA kernels produce in-kernel."""
    return quantize_fp8(x) if quantize else (x, x_scales)


# ----------------------------------------------------------------------------- the ops
def dispatch(x, x_scales, topk_idx, topk_weights, workspace, peer_ptrs, group_name, plan,
             num_sms, quantize_fp8=False):
    x, x_scales = _quantized(x, x_scales, quantize_fp8)
    route = _dispatch(x, x_scales, topk_idx, topk_weights, workspace, group_name, plan, False)
    return route.expert_offsets, route.token_rows


def combine(expert_out, topk_idx, topk_weights, token_rows, expert_offsets, workspace, peer_ptrs,
            group_name, plan, num_sms):
    valid_rows = torch.arange(int(expert_offsets[-1]))
    return _combine(expert_out, topk_idx, topk_weights, token_rows, valid_rows, workspace,
                    group_name, plan, False)


def combine_symmetric(expert_out, segment_bases, segment, segment_offset, topk_idx, topk_weights,
                      token_rows, expert_offsets, workspace, peer_ptrs, group_name, plan, num_sms):
    # Peers' addresses mean nothing to gloo: the exchange is combine's. The segment table is
    # still checked, so a direct call of the op gets the error the CUDA binding gives.
    check_segment_table(segment_bases, segment, segment_offset, workspace, plan)
    return combine(expert_out, topk_idx, topk_weights, token_rows, expert_offsets, workspace,
                   peer_ptrs, group_name, plan, num_sms)


def low_latency_dispatch(x, x_scales, topk_idx, topk_weights, workspace, peer_ptrs, group_name,
                         plan, num_sms, quantize_fp8=False):
    x, x_scales = _quantized(x, x_scales, quantize_fp8)
    route = _dispatch(x, x_scales, topk_idx, topk_weights, workspace, group_name, plan, True)
    # token_rows are already flat rows j * W * T + slot: see _Route's expert_base.
    return route.recv_counts, route.token_rows


def low_latency_combine(expert_out, topk_idx, topk_weights, token_rows, recv_counts, workspace,
                        peer_ptrs, group_name, plan, num_sms):
    rows_total = _window_rows(plan, True)
    local = recv_counts.numel()
    per_expert = rows_total // local
    valid_rows = torch.cat([
        torch.arange(j * per_expert, j * per_expert + int(recv_counts[j])) for j in range(local)
    ]) if local else torch.empty(0, dtype=torch.long)
    return _combine(expert_out, topk_idx, topk_weights, token_rows, valid_rows, workspace,
                    group_name, plan, True)


def swiglu_rows(gate_up, row_ends):
    width = gate_up.size(1) // 2
    out = gate_up.new_zeros([gate_up.size(0), width])
    rows = min(max(int(row_ends[-1]), 0), gate_up.size(0))
    gate, up = gate_up[:rows, :width], gate_up[:rows, width:]
    out[:rows] = torch.nn.functional.silu(gate) * up
    return out
