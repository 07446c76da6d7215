"""Benchmark with one process per GPU (several NVLink-connected GPUs of one host), against NCCL.

    python3 -m torch_swiftep.bench.multi_gpu_vs_nccl --out DIR

Measures, in one run: the peer-to-peer copy ceiling between two GPUs (copy engine), NCCL
all_to_all_single with the permutation to expert-major a user then needs, and swiftep dispatch /
combine at the prefill shape (throughput schedule) and the decode shape (low-latency schedule),
bf16 and FP8, over an SM-budget sweep. Every swiftep result is checked against the reference
first (testing.run_step: dispatch bit-exact, combine of the fake expert). Algorithm bandwidth
uses DeepEP's convention (received (token, rank) pairs x hidden x element size / time, per
rank). NVLink multicast stays off: the ranks run with launch.NO_MULTICAST_ENV.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from .. import Communicator, testing
from ..launch import NO_MULTICAST_ENV, run_world
from .metrics import RoutingBytes, format_table
from .timing import time_fn

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
    for label, tokens, schedule in (("prefill", args.tokens, "throughput"),
                                    ("decode", args.decode_tokens, "low_latency")):
        case = testing.Case(tokens, torch.bfloat16, args.hidden, args.topk, "uniform",
                            args.experts, (tokens,) * world)
        low_latency = schedule == "low_latency"
        cfg = case.config(capacity=tokens * args.topk * 2,
                          ll_max_tokens_per_rank=tokens if low_latency else 0, timeout_s=30)
        comm = Communicator(group, cfg, device=device)
        # correctness first: this rank's step against the whole-world reference; its zero-copy
        # expert output stays in the combine window, which the timed combines read
        exp = testing.expected(case)
        errors += testing.run_step(comm, rank, exp, zero_copy=True, schedules=(schedule,),
                                   device=device)
        x, idx, w, _ = exp.rank_inputs(rank, device)
        pairs = RoutingBytes.of(exp.inputs.topk_idx[rank], args.experts, world).token_rank_pairs
        rows += _sm_sweep(comm, low_latency, x, idx, w, pairs, label, tokens, args.hidden, group)
        nccl_ms = _timed(lambda: _nccl_dispatch(x, idx, args.experts, world, group), group)
        rows.append([label, tokens, "bf16 NCCL+permute", "all", nccl_ms * 1e3,
                     pairs * args.hidden * 2 / (nccl_ms * 1e-3) / 1e9, float("nan"),
                     float("nan")])
        if rank == 0:
            print(f"{label}: {tokens} tokens/rank measured", flush=True)
        del comm
        torch.cuda.empty_cache()
    return dict(rows=rows, errors=errors)


def _sm_sweep(comm, low_latency, x, idx, w, pairs, label, tokens, hidden, group) -> list:
    """Rows [label, tokens, dtype, SMs, dispatch us, dispatch algbw, combine us, combine
    algbw] over SM_SWEEP, bf16 then FP8 (quantize_fp8=True). Combine = the dispatch + combine
    time - the dispatch time; it reads the combine window as it is."""
    dispatch = comm.low_latency_dispatch if low_latency else comm.dispatch
    combine = comm.low_latency_combine if low_latency else comm.combine
    buffer = comm.low_latency_combine_buffer() if low_latency else comm.combine_buffer()
    rows = []
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
                         pairs * hidden * elem / (d_ms * 1e-3) / 1e9, c_ms * 1e3,
                         pairs * hidden * 2 / (c_ms * 1e-3) / 1e9])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m torch_swiftep.bench.multi_gpu_vs_nccl",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=None,
                        help="GPUs, one rank each (default: all GPUs of this host)")
    parser.add_argument("--tokens", type=int, default=4096,
                        help="tokens per rank of the prefill shape, throughput schedule "
                             "(default: 4096)")
    parser.add_argument("--decode-tokens", type=int, default=128,
                        help="tokens per rank of the decode shape, low-latency schedule "
                             "(default: 128)")
    parser.add_argument("--hidden", type=int, default=7168, help="hidden size (default: 7168)")
    parser.add_argument("--topk", type=int, default=8, help="experts per token (default: 8)")
    parser.add_argument("--experts", type=int, default=256,
                        help="experts in the world (default: 256)")
    parser.add_argument("--out", default=None, help="folder for multi_gpu.json")
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count()
    world = args.world or gpus
    if world < 2 or world > gpus:
        raise SystemExit(f"--world={world} needs 2..{gpus} GPUs (found {gpus})")
    p2p = p2p_copy_gbps()
    print(f"{world} GPUs ({torch.cuda.get_device_name(0)}); GPU0->GPU1 copy engine "
          f"{p2p:.0f} GB/s one way")
    results = run_world(world, _rank_main, args, backend="nccl", env=NO_MULTICAST_ENV,
                        timeout_s=1500)
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
