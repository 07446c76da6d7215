"""The main job on a CPU-only machine: an emulated world of gloo processes runs dispatch and
combine at a realistic shape, checks every rank against the reference and reports timings."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .. import CommConfig, Communicator, reference, testing
from ..launch import run_world
from .metrics import RoutingBytes, format_table

ITERS = 3


def _rank_job(rank, world, shape):
    torch.set_num_threads(1)
    tokens, hidden, topk, experts, dtype = (shape["tokens"], shape["hidden"], shape["topk"],
                                            shape["experts"], shape["dtype"])
    inp = testing.world_inputs(shape["seed"], [tokens] * world, hidden, experts, topk, dtype)
    config = CommConfig(num_experts=experts, hidden=hidden, num_topk=topk,
                        max_tokens_per_rank=tokens, dtype=dtype,
                        capacity=tokens * topk * 2)
    comm = Communicator(dist.group.WORLD, config)
    x, idx, w = inp.xs[rank], inp.topk_idx[rank], inp.topk_weights[rank]
    times_d, times_c = [], []
    for _ in range(ITERS):
        dist.barrier()
        t0 = time.perf_counter()
        handle = comm.dispatch(x, idx, w)
        t1 = time.perf_counter()
        out = comm.combine_buffer()
        out.copy_(testing.fake_expert(handle.recv_x, handle.expert_offsets, dtype))
        dist.barrier()
        t2 = time.perf_counter()
        y = comm.combine(out, handle)
        t3 = time.perf_counter()
        times_d.append(t1 - t0)
        times_c.append(t3 - t2)
    # check against the whole-world reference (each rank rebuilds every rank's inputs)
    ref, ref_rows = reference.dispatch(inp.xs, inp.topk_idx, inp.topk_weights, experts)
    errors = testing.compare_dispatch(rank, handle, ref[rank], ref_rows[rank])
    ref_outs = [testing.fake_expert(r.recv_x, r.expert_offsets, dtype) for r in ref]
    ref_y = reference.combine(ref_outs, inp.topk_idx, inp.topk_weights, ref_rows, experts)
    msg = testing.close(y, ref_y[rank], dtype)
    if msg:
        errors.append(f"rank {rank}: combine {msg}")
    rb = RoutingBytes.of(idx, experts, world)
    return dict(dispatch_s=sorted(times_d)[ITERS // 2], combine_s=sorted(times_c)[ITERS // 2],
                pairs=rb.token_rank_pairs, errors=errors)


def run(world: int = 4, tokens: int = 256, hidden: int = 7168, topk: int = 8,
        experts: int = 256, dtype=torch.bfloat16) -> bool:
    shape = dict(tokens=tokens, hidden=hidden, topk=topk, experts=experts, dtype=dtype, seed=1)
    print(f"torch_swiftep benchmark, CPU backend: {world} gloo processes on this machine "
          "(no GPU found; the same command uses the CUDA kernels on a GPU)")
    results = run_world(world, _rank_job, shape, timeout_s=600)
    row_bytes = hidden * dtype.itemsize
    rows = []
    for op in ("dispatch", "combine"):
        t = max(r[f"{op}_s"] for r in results)  # the world is as slow as its slowest rank
        pairs = sum(r["pairs"] for r in results) / world
        rows.append([op, f"{tokens}x{hidden}", topk, experts, world, str(dtype).split(".")[-1],
                     t * 1e3, pairs * row_bytes / t / 1e9])
    errors = [e for r in results for e in r["errors"]]
    ok = not errors
    headers = ["op", "tokens/rank x hidden", "topk", "experts", "world", "dtype", "time ms",
               "algbw GB/s/rank"]
    print(format_table(headers + ["check"], [row + ["passed" if ok else "FAILED"]
                                             for row in rows]))
    for e in errors[:10]:
        print("  ", e)
    return ok
