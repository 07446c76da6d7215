"""The main job on a GPU: W ranks emulated inside ONE process on one GPU.

Each rank has its own workspace and stream; the peer table is built by hand, so the kernels are
exactly those of a real multi-GPU run, with NVLink replaced by HBM. All ranks' calls of one step
are captured in one CUDA graph (fork/join over the ranks' streams) and replayed, so host launch
gaps stay out of the figures. Reported per shape: time, algorithm bandwidth (DeepEP's
convention), SMs used, and HBM-traffic efficiency = least bytes the op must move / time / the
device-to-device copy rate measured in the same run (both counting read + write). The plain-torch
path a user would otherwise write runs in the same process for comparison.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch

from .. import CommConfig, Communicator, reference, testing
from .metrics import RoutingBytes, combine_min_bytes, dispatch_min_bytes, format_table
from .torch_baseline import torch_combine, torch_dispatch

COPY_BYTES = 2 << 30  # large enough to defeat the 50 MB L2
WARMUP, ITERS = 3, 20


def copy_ceiling_gbps(device) -> float:
    """Device-to-device copy rate, read + write bytes per second (GB/s)."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def time_fn(fn: Callable, iters: int = ITERS, before: Callable | None = None) -> float:
    """Median milliseconds of fn over iters runs (after WARMUP runs), timed with events.
    before(), if given, runs ahead of each timed call, outside the timed region (e.g. a barrier
    so every rank starts together)."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def fork_join(fns: list[Callable], streams: list[torch.cuda.Stream]) -> list:
    """Run fns[r] on streams[r], all after the current stream's work; join them back."""
    current = torch.cuda.current_stream()
    outs = []
    for fn, stream in zip(fns, streams):
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            outs.append(fn())
    for stream in streams:
        current.wait_stream(stream)
    return outs


def graph_ms(step: Callable, iters: int = ITERS) -> tuple[float, object]:
    """Capture step() in a CUDA graph and return (median ms per replay, step's outputs)."""
    step()  # eager warm-up: kernel loading, allocator pools
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    ms = time_fn(graph.replay, iters)
    return ms, outs


class EmulatedWorld:
    def __init__(self, world, tokens, hidden, topk, experts, dtype, device, seed=0,
                 ll_tokens=0, routing="uniform"):
        self.world, self.tokens, self.hidden, self.topk, self.experts, self.dtype = (
            world, tokens, hidden, topk, experts, dtype)
        self.inputs = testing.world_inputs(seed, [tokens] * world, hidden, experts, topk, dtype,
                                           routing)
        rows_expected = tokens * topk  # per rank under uniform routing
        config = CommConfig(num_experts=experts, hidden=hidden, num_topk=topk,
                            max_tokens_per_rank=tokens, dtype=dtype,
                            capacity=max(rows_expected + rows_expected // 4, 1024),
                            ll_max_tokens_per_rank=ll_tokens, timeout_s=10.0)
        self.comms = Communicator.emulated_world(config, world, device)
        self.streams = [torch.cuda.Stream(device) for _ in range(world)]
        dev = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        self.xs, self.idx, self.w = (dev(self.inputs.xs), dev(self.inputs.topk_idx),
                                     dev(self.inputs.topk_weights))
        self.routing = [RoutingBytes.of(i, experts, world) for i in self.inputs.topk_idx]
        for comm in self.comms:  # expert outputs for combine: any finite data
            comm.combine_buffer().normal_()

    def dispatch_step(self, num_sms, fp8=False):
        def make(r):
            return lambda: self.comms[r].dispatch(self.xs[r], self.idx[r], self.w[r],
                                                  num_sms=num_sms, quantize_fp8=fp8)
        return lambda: fork_join([make(r) for r in range(self.world)], self.streams)

    def dispatch_combine_step(self, num_sms, fp8=False):
        def make(r):
            def call():
                comm = self.comms[r]
                h = comm.dispatch(self.xs[r], self.idx[r], self.w[r], num_sms=num_sms,
                                  quantize_fp8=fp8)
                return h, comm.combine(comm.combine_buffer(), h, num_sms=num_sms)
            return call
        return lambda: fork_join([make(r) for r in range(self.world)], self.streams)

    def check(self, handles, ranks) -> list[str]:
        """Bit-exact dispatch check of the given ranks against the reference."""
        ref, ref_rows = reference.dispatch(self.inputs.xs, self.inputs.topk_idx,
                                           self.inputs.topk_weights, self.experts)
        errors = []
        for r in ranks:
            errors += testing.compare_dispatch(r, handles[r], ref[r], ref_rows[r])
        return errors

    def check_combine(self, pairs, ranks) -> list[str]:
        handles = [h for h, _ in pairs]
        outs = [c.combine_buffer().cpu() for c in self.comms]
        ref_y = reference.combine(outs, self.inputs.topk_idx, self.inputs.topk_weights,
                                  [h.token_rows.cpu() for h in handles], self.experts)
        errors = []
        for r in ranks:
            msg = testing.close(pairs[r][1], ref_y[r], self.dtype)
            if msg:
                errors.append(f"rank {r}: combine {msg}")
        return errors

    def free(self):
        del self.comms
        torch.cuda.empty_cache()


def run(world=8, tokens=4096, hidden=7168, topk=8, experts=256, sms_per_rank=(1, 2, 3, 4),
        token_sweep=(512, 1024, 2048, 4096), out_dir=None, check=True) -> bool:
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    ceiling = copy_ceiling_gbps(device)
    print(f"torch_swiftep benchmark on {props.name} ({props.multi_processor_count} SMs): "
          f"{world} ranks emulated in one process; device-to-device copy "
          f"{ceiling:.0f} GB/s (read + write)")
    dtype, row_bytes = torch.bfloat16, hidden * 2
    records, errors = [], []

    def measure(tok, sms, check_now):
        world_ = EmulatedWorld(world, tok, hidden, topk, experts, dtype, device, seed=tok)
        d_ms, handles = graph_ms(world_.dispatch_step(sms))
        dc_ms, pairs = graph_ms(world_.dispatch_combine_step(sms))
        torch.cuda.synchronize()
        if check_now:
            errors.extend(world_.check([h for h, _ in pairs], [0, world - 1]))
            errors.extend(world_.check_combine(pairs, [0, world - 1]))
        c_ms = max(dc_ms - d_ms, 1e-6)
        pairs_per_rank = sum(r.token_rank_pairs for r in world_.routing) / world
        d_min = sum(dispatch_min_bytes(r, row_bytes) for r in world_.routing)
        c_min = sum(combine_min_bytes(r, row_bytes) for r in world_.routing)
        rows_written = sum(r.rows for r in world_.routing) * row_bytes
        for op, ms, least in (("dispatch", d_ms, d_min), ("combine", c_ms, c_min)):
            records.append(dict(
                op=op, tokens=tok, sms_per_rank=sms, sms_total=sms * world, ms=ms,
                algbw_gbps=pairs_per_rank * row_bytes / (ms * 1e-3) / 1e9,
                moved_gbps=rows_written / world / (ms * 1e-3) / 1e9,
                hbm_eff=least / (ms * 1e-3) / 1e9 / ceiling))
        world_.free()
        return world_

    for sms in sms_per_rank:
        measure(tokens, sms, check and sms == sms_per_rank[-1])
    for tok in token_sweep:
        if tok != tokens:
            measure(tok, sms_per_rank[-1], False)

    baseline = torch_baseline(world, tokens, hidden, topk, experts, dtype, device)
    headers = ["op", "tokens/rank", "SMs/rank", "SMs total", "time ms", "algbw GB/s/rank",
               "rows GB/s/rank", "HBM eff", "vs torch"]
    table = []
    for rec in records:
        speedup = ""
        if rec["tokens"] == tokens:
            speedup = f"{baseline[rec['op']] / rec['ms']:.1f}x"
        table.append([rec["op"], rec["tokens"], rec["sms_per_rank"], rec["sms_total"],
                      rec["ms"], rec["algbw_gbps"], rec["moved_gbps"],
                      f"{rec['hbm_eff']:.0%}", speedup])
    print(format_table(headers, table))
    print(f"plain torch at {tokens} tokens/rank (whole GPU, all ranks back to back): "
          f"dispatch {baseline['dispatch']:.3f} ms, combine {baseline['combine']:.3f} ms")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "throughput.json"), "w") as f:
            json.dump(dict(device=props.name, ceiling_gbps=ceiling, world=world, hidden=hidden,
                           topk=topk, experts=experts, records=records, baseline_ms=baseline),
                      f, indent=1)
        plot(records, tokens, os.path.join(out_dir, "throughput.png"), props.name, world)
    for e in errors[:10]:
        print("CHECK FAILED:", e)
    print("check:", "passed" if not errors else "FAILED")
    return not errors


def torch_baseline(world, tokens, hidden, topk, experts, dtype, device) -> dict:
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


def plot(records, tokens, path, device_name, world):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for op, marker in (("dispatch", "o"), ("combine", "s")):
        by_sms = sorted((r["sms_total"], r["algbw_gbps"]) for r in records
                        if r["op"] == op and r["tokens"] == tokens)
        axes[0].plot(*zip(*by_sms), marker=marker, label=op)
        top = max(r["sms_per_rank"] for r in records)
        by_tok = sorted((r["tokens"], r["algbw_gbps"]) for r in records
                        if r["op"] == op and r["sms_per_rank"] == top)
        axes[1].plot(*zip(*by_tok), marker=marker, label=op)
    axes[0].set_xlabel(f"SMs used (all {world} ranks)")
    axes[0].set_title(f"{tokens} tokens/rank")
    axes[1].set_xlabel("tokens per rank")
    axes[1].set_xscale("log", base=2)
    axes[1].set_title(f"{top * world} SMs")
    for ax in axes:
        ax.set_ylabel("algorithm bandwidth per rank (GB/s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"torch_swiftep, {world} ranks emulated on one {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
