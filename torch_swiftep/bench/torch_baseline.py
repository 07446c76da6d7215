"""What a user writes in plain torch without this library: sort (token, slot) pairs by expert,
gather them into per-destination send buffers (top-k fan-out), "all-to-all" them (on one GPU: a
copy of each rank's chunk into the destination's buffer, as NCCL would), then permute the
received rows to expert-major; combine undoes each step and reduces with the weights.
torch_baseline_ms times it on a GPU, all ranks back to back."""
from __future__ import annotations

import torch

from .. import testing
from .timing import time_fn


def torch_dispatch(xs, topk_idx, num_experts):
    """Every rank's inputs -> (per destination: expert-major rows [R, hidden], a plan that
    combine needs)."""
    world = len(xs)
    local = num_experts // world
    sends, src_plans = [], []
    for x, idx in zip(xs, topk_idx):
        flat = idx.flatten()
        order = torch.argsort(flat.masked_fill(flat < 0, num_experts), stable=True)
        valid = int((flat >= 0).sum())
        order = order[:valid]
        send = x.index_select(0, order // idx.size(1))  # fan-out: one row per (token, slot)
        counts = torch.bincount(flat[order] // local, minlength=world)
        sends.append((send, flat[order]))
        src_plans.append((order, counts))
    recvs, dst_plans = [], []
    all_counts = [c.tolist() for _, c in src_plans]  # the host sync NCCL splits need
    for d in range(world):
        chunks, experts = [], []
        for s in range(world):
            start = sum(all_counts[s][:d])
            n = all_counts[s][d]
            chunks.append(sends[s][0][start:start + n])  # the all-to-all copy
            experts.append(sends[s][1][start:start + n])
        rows = torch.cat(chunks)
        perm = torch.argsort(torch.cat(experts), stable=True)  # source-major -> expert-major
        recvs.append(rows.index_select(0, perm))
        dst_plans.append(perm)
    return recvs, (src_plans, dst_plans, all_counts, [idx.shape for idx in topk_idx])


def torch_combine(expert_outs, plan, topk_weights):
    src_plans, dst_plans, all_counts, shapes = plan
    world = len(expert_outs)
    back = []
    for d in range(world):
        unperm = torch.empty_like(expert_outs[d])
        unperm[dst_plans[d]] = expert_outs[d]  # expert-major -> source-major
        back.append(unperm)
    ys = []
    for s in range(world):
        chunks = []
        for d in range(world):
            start = sum(all_counts[t][d] for t in range(s))
            chunks.append(back[d][start:start + all_counts[s][d]])  # the all-to-all copy back
        rows = torch.cat(chunks)
        order, _ = src_plans[s]
        n, k = shapes[s]
        full = rows.new_zeros(n * k, rows.size(1))
        full[order] = rows
        w = topk_weights[s].reshape(n * k, 1)
        ys.append((full.float() * w).view(n, k, rows.size(1)).sum(1).to(rows.dtype))
    return ys


def torch_baseline_ms(world, tokens, hidden, topk, experts, dtype, device) -> dict:
    """{"dispatch": ms, "combine": ms} of the plain-torch path on the whole GPU."""
    inp = testing.world_inputs(tokens, [tokens] * world, hidden, experts, topk, dtype)
    xs = [x.to(device) for x in inp.xs]
    idx = [i.to(device) for i in inp.topk_idx]
    ws = [w.to(device) for w in inp.topk_weights]
    state = {}

    def dispatch():
        state["d"] = torch_dispatch(xs, idx, experts)

    d_ms = time_fn(dispatch)
    recv, plan = state["d"]
    c_ms = time_fn(lambda: torch_combine(recv, plan, ws))
    return dict(dispatch=d_ms, combine=c_ms)
