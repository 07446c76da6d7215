"""Low-latency (decode) schedule on the one-process emulated world, timed inside CUDA graphs.

For each tokens-per-rank point, reports each op's time beside: its bytes floor (least bytes it
must move at the same run's device-to-device copy rate), the throughput kernels at the same
shape, the plain-torch path, and a launch floor (a graph that forks an empty kernel onto every
rank's stream), so what sets the time (launch, flag round trips, bytes) is measured, not guessed.
"""
from __future__ import annotations

import json
import os

import torch

from .. import reference, testing
from ..fp8 import quantize_fp8
from .gpu_world import EmulatedWorld, copy_ceiling_gbps, fork_join, graph_ms, torch_baseline
from .metrics import combine_min_bytes, dispatch_min_bytes, format_table

TOKEN_POINTS = (1, 8, 128)


def launch_floor_ms(world, streams) -> float:
    """A graph whose ranks each run one empty kernel: the fork/join and launch cost alone."""
    bufs = [torch.zeros(1, device="cuda") for _ in range(world)]
    ms, _ = graph_ms(lambda: fork_join([lambda b=b: b.add_(0) for b in bufs], streams))
    return ms


def run(world=8, hidden=7168, topk=8, experts=256, out_dir=None, check=True,
        sms_per_rank=4) -> bool:
    device = torch.device("cuda", torch.cuda.current_device())
    ceiling = copy_ceiling_gbps(device)
    records, errors = [], []
    floor_launch = None
    for tokens in TOKEN_POINTS:
        for fp8 in (False, True):
            w = EmulatedWorld(world, tokens, hidden, topk, experts, torch.bfloat16, device,
                              seed=tokens + fp8, ll_tokens=tokens)
            if floor_launch is None:
                floor_launch = launch_floor_ms(world, w.streams)

            def dispatch_step():
                return fork_join([
                    (lambda r=r: w.comms[r].low_latency_dispatch(
                        w.xs[r], w.idx[r], w.w[r], quantize_fp8=fp8, num_sms=sms_per_rank))
                    for r in range(world)], w.streams)

            def pair_step():
                def call(r):
                    comm = w.comms[r]
                    h = comm.low_latency_dispatch(w.xs[r], w.idx[r], w.w[r], quantize_fp8=fp8,
                                                  num_sms=sms_per_rank)
                    return h, comm.low_latency_combine(comm.low_latency_combine_buffer(), h,
                                                       num_sms=sms_per_rank)
                return fork_join([(lambda r=r: call(r)) for r in range(world)], w.streams)

            for comm in w.comms:
                comm.low_latency_combine_buffer().normal_()
            d_ms, _ = graph_ms(dispatch_step)
            dc_ms, pairs = graph_ms(pair_step)
            torch.cuda.synchronize()
            if check:
                errors += _check(w, pairs, fp8)
            c_ms = max(dc_ms - d_ms, 1e-6)
            row_d = hidden * (1 if fp8 else 2)
            d_floor = sum(dispatch_min_bytes(r, row_d) for r in w.routing) / (ceiling * 1e9)
            c_floor = sum(combine_min_bytes(r, hidden * 2) for r in w.routing) / (ceiling * 1e9)
            tp = {}
            if not fp8:
                tp_d, _ = graph_ms(w.dispatch_step(sms_per_rank))
                tp_dc, _ = graph_ms(w.dispatch_combine_step(sms_per_rank))
                tp = dict(dispatch=tp_d, combine=max(tp_dc - tp_d, 1e-6))
            base = torch_baseline(world, tokens, hidden, topk, experts, torch.bfloat16, device)
            for op, ms, floor_s in (("dispatch", d_ms, d_floor), ("combine", c_ms, c_floor)):
                records.append(dict(op=op, tokens=tokens, fp8=fp8, us=ms * 1e3,
                                    floor_us=floor_s * 1e6, ratio=ms * 1e-3 / floor_s,
                                    throughput_us=tp.get(op, float("nan")) * 1e3,
                                    torch_us=base[op] * 1e3))
            w.free()
    headers = ["op", "tokens/rank", "dtype", "time us", "bytes floor us", "time/floor",
               "throughput-path us", "plain torch us"]
    rows = [[r["op"], r["tokens"], "fp8" if r["fp8"] else "bf16", r["us"], r["floor_us"],
             f"{r['ratio']:.2f}", r["throughput_us"], r["torch_us"]] for r in records]
    print(f"\nlow-latency schedule, {world} ranks emulated, {sms_per_rank} SMs/rank, "
          f"inside CUDA graphs; copy {ceiling:.0f} GB/s; launch floor (fork/join of {world} "
          f"empty kernels) {floor_launch * 1e3:.1f} us")
    print(format_table(headers, rows))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "low_latency.json"), "w") as f:
            json.dump(dict(ceiling_gbps=ceiling, launch_floor_us=floor_launch * 1e3,
                           records=records), f, indent=1)
    for e in errors[:10]:
        print("CHECK FAILED:", e)
    print("low-latency check:", "passed" if not errors else "FAILED")
    return not errors


def _check(w: EmulatedWorld, pairs, fp8) -> list[str]:
    inp = w.inputs
    xs, scales = inp.xs, None
    if fp8:  # the reference moves the bytes dispatch was given: quantized on the GPU
        q = [quantize_fp8(x) for x in w.xs]
        xs, scales = [a.cpu() for a, _ in q], [b.cpu() for _, b in q]
    ref, ref_rows = reference.low_latency_dispatch(xs, inp.topk_idx, inp.topk_weights,
                                                   w.experts, w.tokens, scales)
    errors = []
    for r in (0, w.world - 1):
        errors += testing.compare_low_latency(r, pairs[r][0], ref[r], ref_rows[r])
    outs = [c.low_latency_combine_buffer().cpu() for c in w.comms]
    ref_y = reference.combine(outs, inp.topk_idx, inp.topk_weights, ref_rows, w.experts)
    for r in (0, w.world - 1):
        msg = testing.close(pairs[r][1], ref_y[r], torch.bfloat16)
        if msg:
            errors.append(f"rank {r}: low-latency combine {msg}")
    return errors
