"""Benchmark with one process per GPU (several NVLink-connected GPUs of one host).

    python3 -m torch_swiftep.bench.multi_gpu --out DIR

Measures, in one run: the peer-to-peer copy ceiling between two GPUs (copy engine), NCCL
all_to_all_single with the permutation to expert-major a user then needs, and swiftep dispatch /
combine at the prefill shape (throughput schedule) and the decode shape (low-latency schedule),
bf16 and FP8, over an SM-budget sweep. Every swiftep result is checked against the reference
first. Algorithm bandwidth uses DeepEP's convention (received (token, rank) pairs x hidden x
element size / time, per rank). NVLink multicast stays off (the caller's environment and
scripts/multi_gpu_round.sh set NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from .. import CommConfig, Communicator, reference, testing
from ..launch import run_world
from .gpu_world import time_fn
from .metrics import RoutingBytes, format_table

SM_SWEEP = (4, 8, 12, 16, 24, 32)
ITERS = 20


def p2p_copy_gbps(nbytes: int = 1 << 30) -> float:
    """GPU 0 -> GPU 1 copy rate through the copy engines, bytes per second one way (GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0").random_()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERS):
        dst.copy_(src)
    end.record()
    end.synchronize()
    torch.cuda.synchronize("cuda:1")
    return nbytes * ITERS / (start.elapsed_time(end) * 1e-3) / 1e9


def _timed(fn, group) -> float:
    """Median ms of fn() over ITERS calls, each started together on every rank."""
    def together():
        dist.barrier(group)
        torch.cuda.synchronize()

    return time_fn(fn, ITERS, before=together)


def _nccl_dispatch(x, idx, experts, world, group):
    """What a user writes with NCCL: sort (token, slot) by expert, gather (fan-out), exchange
    counts, all_to_all_single, permute the received rows to expert-major."""
    local = experts // world
    flat = idx.flatten()
    order = torch.argsort(flat.masked_fill(flat < 0, experts), stable=True)
    valid = int((flat >= 0).sum())
    order = order[:valid]
    send = x.index_select(0, order // idx.size(1))
    send_experts = flat[order]
    send_counts = torch.bincount(send_experts // local, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    sc, rc = send_counts.tolist(), recv_counts.tolist()  # the host sync NCCL's splits need
    recv = send.new_empty(sum(rc), send.size(1))
    dist.all_to_all_single(recv, send, rc, sc, group=group)
    recv_experts = send_experts.new_empty(sum(rc))
    dist.all_to_all_single(recv_experts, send_experts, rc, sc, group=group)
    return recv.index_select(0, torch.argsort(recv_experts, stable=True))


def _rank_main(rank, world, args):
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = dist.group.WORLD
    rows, errors = [], []
    for label, tokens, low_latency in (("prefill", args.tokens, False),
                                       ("decode", args.decode_tokens, True)):
        inp = testing.world_inputs(tokens, [tokens] * world, args.hidden, args.experts,
                                   args.topk, torch.bfloat16)
        x, idx, w = (t[rank].to(device) for t in (inp.xs, inp.topk_idx, inp.topk_weights))
        pairs = RoutingBytes.of(inp.topk_idx[rank], args.experts, world).token_rank_pairs
        row_bytes = args.hidden * 2
        cfg = CommConfig(num_experts=args.experts, hidden=args.hidden, num_topk=args.topk,
                         max_tokens_per_rank=tokens, capacity=tokens * args.topk * 2,
                         ll_max_tokens_per_rank=tokens if low_latency else 0, timeout_s=30)
        comm = Communicator(group, cfg, device=device)
        dispatch = comm.low_latency_dispatch if low_latency else comm.dispatch
        combine = comm.low_latency_combine if low_latency else comm.combine
        buffer = comm.low_latency_combine_buffer() if low_latency else comm.combine_buffer()
        # correctness first: this rank's dispatch against the whole-world reference
        handle = dispatch(x, idx, w)
        comm.check()
        if low_latency:
            ref, ref_rows = reference.low_latency_dispatch(inp.xs, inp.topk_idx,
                                                           inp.topk_weights, args.experts,
                                                           tokens)
            errors += testing.compare_low_latency(rank, handle, ref[rank], ref_rows[rank])
        else:
            ref, ref_rows = reference.dispatch(inp.xs, inp.topk_idx, inp.topk_weights,
                                               args.experts)
            errors += testing.compare_dispatch(rank, handle, ref[rank], ref_rows[rank])
        buffer.normal_()
        for fp8 in (False, True):
            for sms in SM_SWEEP:
                def d():
                    return dispatch(x, idx, w, num_sms=sms, quantize_fp8=fp8)

                def dc():
                    return combine(buffer, d(), num_sms=sms)

                d_ms, dc_ms = _timed(d, group), _timed(dc, group)
                c_ms = max(dc_ms - d_ms, 1e-6)
                elem = 1 if fp8 else 2
                rows.append([label, tokens, "fp8" if fp8 else "bf16", sms, d_ms * 1e3,
                             pairs * args.hidden * elem / (d_ms * 1e-3) / 1e9, c_ms * 1e3,
                             pairs * row_bytes / (c_ms * 1e-3) / 1e9])
        nccl_ms = _timed(lambda: _nccl_dispatch(x, idx, args.experts, world, group), group)
        rows.append([label, tokens, "bf16 NCCL+permute", "all", nccl_ms * 1e3,
                     pairs * row_bytes / (nccl_ms * 1e-3) / 1e9, float("nan"), float("nan")])
        del comm
        torch.cuda.empty_cache()
    return dict(rows=rows, errors=errors)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m torch_swiftep.bench.multi_gpu",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=None, help="GPUs (default: all)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count()
    world = args.world or gpus
    if world < 2 or world > gpus:
        raise SystemExit(f"--world={world} needs 2..{gpus} GPUs (found {gpus})")
    p2p = p2p_copy_gbps()
    print(f"{world} GPUs ({torch.cuda.get_device_name(0)}); GPU0->GPU1 copy engine "
          f"{p2p:.0f} GB/s one way")
    env = {k: os.environ.get(k, v) for k, v in (("NCCL_NVLS_ENABLE", "0"),
                                                ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                                                ("NVSHMEM_DISABLE_NVLS", "1"))}
    results = run_world(world, _rank_main, args, backend="nccl", env=env, timeout_s=1500)
    headers = ["shape", "tokens/rank", "dtype", "SMs", "dispatch us", "dispatch algbw GB/s",
               "combine us", "combine algbw GB/s"]
    # the world is as slow as its slowest rank: report rank-wise maxima of time
    merged = []
    for i, row in enumerate(results[0]["rows"]):
        times = [r["rows"][i] for r in results]
        d_us = max(t[4] for t in times)
        c_us = max(t[6] for t in times)
        merged.append(row[:4] + [d_us, row[5] * row[4] / d_us, c_us,
                                 row[7] * row[6] / c_us if c_us == c_us else c_us])
    print(format_table(headers, merged))
    errors = [e for r in results for e in r["errors"]]
    for e in errors[:10]:
        print("CHECK FAILED:", e)
    print(f"peer-to-peer ceiling {p2p:.0f} GB/s; check:", "passed" if not errors else "FAILED")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "multi_gpu.json"), "w") as f:
            json.dump(dict(world=world, p2p_gbps=p2p, headers=headers, rows=merged,
                           errors=errors), f, indent=1)
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
