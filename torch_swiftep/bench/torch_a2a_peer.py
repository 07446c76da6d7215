"""torch's own expert-parallel all-to-all as a peer of the multi-process benchmark
(multi_process.py): `torch.ops.symm_mem.all_to_all_vdev_2d` over torch's NVSHMEM symmetric
memory, plus what a user must add around it to get swiftep's results, with the same inputs.

- dispatch: sort the (token, slot) pairs by global expert (rank-major, expert-minor), gather
  the token rows into a symmetric send buffer in that order (the top-k fan-out), count rows per
  expert, then all_to_all_vdev_2d, which lands the rows expert-major on their owner (every
  expert's rows from every source rank together; splits and offsets on the device, no host
  sync);
- combine: all_to_all_vdev_2d_offset sends the experts' rows back (the reverse shuffle; the
  experts here are the identity), then the weighted sum per token in float32 (index_add).

SM budget: not settable. torch launches min(world x experts per rank, 64) blocks of 512 threads
per rank for the exchange, and the permutation's sort, gathers and sums run on the whole GPU;
the same figure is quoted beside every swiftep SM budget.

Limits, reported as "not run: <reason>" (the last line of the ranks' error): torch's exchange
kernel takes at most 16 experts per rank (NUM_TILES in torch's nvshmem_extension.cu; the
standard 256-expert, 8-rank shape has 32: try --experts 128), and NVSHMEM must start with
several ranks on one GPU (under MPS). Timed like swiftep (chained CUDA graphs, slope) when the
calls can be captured, else with CUDA events after a host barrier; the result says which.
"""
from __future__ import annotations

import math
import os

SM_BUDGET = ("not settable: min(world x experts/rank, 64) blocks of 512 threads per rank for "
             "the exchange, the permutation on the whole GPU; one figure for every budget")


class _Exchange:
    """One rank's symmetric buffers and calls, sized for `tokens` tokens per rank."""

    def __init__(self, shape, group_name, device):
        import torch
        import torch.distributed._symmetric_memory as symm_mem

        e, k, h, n = shape["experts"], shape["topk"], shape["hidden"], shape["tokens"]
        self.experts, self.topk, self.name = e, k, group_name
        self.cap_in, self.cap_out = n * k, n * k * 3 // 2  # rows sent / received at most
        bf16, i64 = torch.bfloat16, torch.int64
        self.send = symm_mem.empty(self.cap_in, h, dtype=bf16, device=device)
        self.recv = symm_mem.empty(self.cap_out, h, dtype=bf16, device=device).zero_()
        self.back = symm_mem.empty(self.cap_in, h, dtype=bf16, device=device).zero_()
        self.in_splits = symm_mem.empty(e, dtype=i64, device=device)
        self.out_so = symm_mem.empty(2, e, dtype=i64, device=device)
        self.in_so = symm_mem.empty(2, e, dtype=i64, device=device)
        self.back_so = symm_mem.empty(2, e, dtype=i64, device=device)
        for t in (self.send, self.recv, self.back, self.in_splits, self.out_so, self.in_so,
                  self.back_so):
            symm_mem.rendezvous(t, group_name)

    def set_inputs(self, x, topk_idx, topk_weights):
        self.x, self.idx, self.w = x, topk_idx, topk_weights

    def dispatch(self):
        import torch

        flat = self.idx.flatten()
        key = flat.masked_fill(flat < 0, self.experts)  # no expert: sorted last, never sent
        order = torch.argsort(key, stable=True)
        rows = flat.numel()
        torch.index_select(self.x, 0, order // self.topk, out=self.send[:rows])
        counts = torch.zeros(self.experts + 1, dtype=torch.int64, device=flat.device)
        counts.index_add_(0, key, torch.ones_like(key))  # (bincount would sync with the host)
        self.in_splits.copy_(counts[:self.experts])
        torch.ops.symm_mem.all_to_all_vdev_2d(self.send, self.recv, self.in_splits, self.out_so,
                                              self.name)
        return order, key

    def combine(self, order, key):
        import torch

        self.in_so.copy_(self.out_so)  # the received rows' splits and offsets, expert-major
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(self.recv, self.back, self.in_so,
                                                     self.back_so, self.name)
        rows = order.numel()  # back[j] is the row sent as send[j]: (token, slot) order[j]
        valid = (key[order] < self.experts).unsqueeze(1)
        weighted = torch.where(valid, self.back[:rows].float()
                               * self.w.flatten()[order].unsqueeze(1), 0.0)
        y = torch.zeros(self.x.shape, dtype=torch.float32, device=self.x.device)
        y.index_add_(0, order // self.topk, weighted)
        return y.to(self.x.dtype)

    def step(self):
        return self.combine(*self.dispatch())


# torch's all_to_all_vdev_2d limits (its NVSHMEM extension: experts per rank <= its tile count,
# world <= 32): checked here so a run that cannot work spawns no world.
MAX_LOCAL_EXPERTS, MAX_WORLD = 16, 32

def _check(ex, rank, shape, device) -> list[str]:
    """One step at check_tokens per rank: rows received as the routing implies, and combine of
    the identity experts = each token times the sum of its valid weights."""
    import torch

    from .. import testing
    from .multi_process import rank_inputs

    local = shape["experts"] // shape["world"]
    tokens = min(shape["check_tokens"], shape["tokens"])
    x, idx, w, every_idx = rank_inputs(shape, tokens, rank, device, seed=1)
    ex.set_inputs(x, idx, w)
    y = ex.step()
    torch.cuda.synchronize()
    want = sum(int(((i >= 0) & (i // local == rank)).sum()) for i in every_idx)
    got = int(ex.out_so[0].sum())
    errors = [] if got == want else [f"rank {rank}: received {got} rows, the routing sends {want}"]
    ref = x.float().cpu() * (w.cpu() * (idx.cpu() >= 0)).sum(1, keepdim=True)
    msg = testing.close(y, ref, torch.bfloat16)
    if msg:
        errors.append(f"rank {rank}: combine of the identity experts: {msg}")
    return errors


def _time(ex, group, chain, repeats) -> tuple[str, dict]:
    from .rank_timing import time_dispatch_and_step

    ex.step()  # eager, then the capacity the routing needs
    if int(ex.out_so[0].sum()) > ex.cap_out:
        raise RuntimeError(f"received {int(ex.out_so[0].sum())} rows > capacity {ex.cap_out}")
    calls = (ex.dispatch, ex.step)
    failed, ops = time_dispatch_and_step(group, calls, calls, chain, repeats)
    if failed is None:
        return "chained CUDA graphs, as swiftep's", ops
    return f"CUDA events after a host barrier (capture failed: {failed})", ops


def _rank(rank, world, shape, chain, repeats):
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    from ..launch import rank_gpu
    from .multi_process import agree, rank_inputs

    device = torch.device("cuda", rank_gpu(rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    group = dist.group.WORLD
    rows = shape["tokens"] * shape["topk"]
    heap = (2 * rows + rows * 3 // 2) * shape["hidden"] * 2 + (256 << 20)
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", f"{math.ceil(heap / (1 << 30))}G")
    symm_mem.set_backend("NVSHMEM")  # before the first symmetric allocation of this process
    ex = _Exchange(shape, group.group_name, device)
    dist.barrier(group)
    errors = _check(ex, rank, shape, device) if shape["check_tokens"] else []
    if any(agree(errors, group)):
        return dict(errors=errors)
    x, idx, w, _ = rank_inputs(shape, shape["tokens"], rank, device, seed=shape["tokens"])
    ex.set_inputs(x, idx, w)
    timing, ops = _time(ex, group, chain, repeats)
    torch.cuda.synchronize()
    return dict(errors=[], timing=timing, ops=ops)


def run(shape: dict, budgets, chain, repeats, timeout_s) -> dict:
    """{status, timing, sm_budget, by_sms {sms: {dispatch, combine, step}} (one figure for
    every budget), errors}; status "not run: <reason>" when it cannot run here."""
    from ..launch import WorldError, run_world
    from .multi_process import ENV
    from .multi_process_records import slowest

    result = dict(status="ran", sm_budget=SM_BUDGET, by_sms={}, errors=[], timing=None)
    local = shape["experts"] // shape["world"]
    if local > MAX_LOCAL_EXPERTS or shape["world"] > MAX_WORLD:  # refused before any spawn
        result["status"] = (f"not run: all_to_all_vdev_2d takes at most {MAX_LOCAL_EXPERTS} "
                            f"experts per rank and {MAX_WORLD} ranks (here {local} and "
                            f"{shape['world']})")
        print(f"torch all_to_all_vdev_2d: {result['status']}", flush=True)
        return result
    try:  # torch's own checks fail on every rank alike
        ranks = run_world(shape["world"], _rank, shape, chain, repeats, env=ENV,
                          timeout_s=min(timeout_s, 300))
    except WorldError as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        result["status"] = f"not run: {lines[-1][:300] if lines else exc}"
    else:
        result["errors"] = [e for r in ranks for e in r["errors"]]
        if result["errors"]:
            result["status"] = f"check FAILED, not timed ({result['errors'][0]})"
        else:
            ops = slowest([r["ops"] for r in ranks])
            result["by_sms"] = {sms: ops for sms in budgets}
            result["timing"] = "; ".join(sorted({r["timing"] for r in ranks}))
    print(f"torch all_to_all_vdev_2d: {result['status']}", flush=True)
    return result
