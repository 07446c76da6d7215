"""Low-latency (decode) schedule on the one-process emulated world, timed inside CUDA graphs.

Per-call time is measured the way a decode step runs: each rank's stream runs L calls back to
back (layer after layer, no host and no join between them; the ranks meet only through their
device flags), all captured in one CUDA graph. The graph is timed for a short and a long chain,
and per call = (t_long - t_short) / (L_long - L_short): the fork/join of the emulated ranks' streams
(one per graph, ~25 us, paid by no real deployment) cancels out.

Reported per tokens-per-rank point, beside the time:
- its bytes floor: the least bytes the op must move, at the same run's device-to-device copy rate;
- what the rest is made of, measured in the same run: the launch of one kernel inside a graph
  (a chain of empty kernels), and the protocol (the same op with 0 tokens: launch plus its flag
  round trips);
- the throughput kernels at the same shape (same chained timing) and the plain-torch path.
"""
from __future__ import annotations

import json
import os

import torch

from .. import reference, testing
from ..fp8 import quantize_fp8
from . import phase_trace
from .gpu_world import EmulatedWorld, copy_ceiling_gbps, fork_join, graph_ms, torch_baseline
from .metrics import combine_min_bytes, dispatch_min_bytes, format_table, fp8_row_bytes

TOKEN_POINTS = (1, 8, 128)
SHORT, LONG = 2, 10  # chain lengths (calls per rank per graph)
DEFAULT_SMS_PER_RANK = 16  # 8 ranks x 16 = 128 of the H100/H200's 132 SMs, side by side


def chained(per_rank_call, world, streams, layers):
    """A step running per_rank_call(r) `layers` times on rank r's stream (one fork/join)."""
    def rank_chain(r):
        return [per_rank_call(r) for _ in range(layers)]
    return lambda: fork_join([(lambda r=r: rank_chain(r)) for r in range(world)], streams)


def per_call_us(per_rank_call, world, streams) -> tuple[float, float, list]:
    """(us per call from the chain slope, us of a one-call graph with its fork/join, the last
    call's outputs of every rank)."""
    ms_one, _ = graph_ms(chained(per_rank_call, world, streams, 1))
    ms_short, _ = graph_ms(chained(per_rank_call, world, streams, SHORT))
    ms_long, outs = graph_ms(chained(per_rank_call, world, streams, LONG))
    slope = (ms_long - ms_short) / (LONG - SHORT)
    return slope * 1e3, ms_one * 1e3, [chain[-1] for chain in outs]


def launch_us(world, streams) -> float:
    """One empty kernel per rank per layer: what a kernel launch inside a graph costs."""
    bufs = [torch.zeros(1, device="cuda") for _ in range(world)]
    us, _, _ = per_call_us(lambda r: bufs[r].add_(0), world, streams)
    return us


class _Calls:
    """The per-rank calls of one emulated world, for the chain timer."""

    def __init__(self, w: EmulatedWorld, sms: int, fp8: bool, tokens: int):
        self.w, self.sms, self.fp8, self.n = w, sms, fp8, tokens

    def _inputs(self, r):
        w = self.w
        return w.xs[r][:self.n], w.idx[r][:self.n], w.w[r][:self.n]

    def ll_dispatch(self, r):
        comm = self.w.comms[r]
        return comm.low_latency_dispatch(*self._inputs(r), quantize_fp8=self.fp8,
                                         num_sms=self.sms)

    def ll_pair(self, r):
        comm = self.w.comms[r]
        h = self.ll_dispatch(r)
        return h, comm.low_latency_combine(comm.low_latency_combine_buffer(), h,
                                           num_sms=self.sms)

    def tp_dispatch(self, r):
        return self.w.comms[r].dispatch(*self._inputs(r), num_sms=self.sms)

    def tp_pair(self, r):
        comm = self.w.comms[r]
        h = self.tp_dispatch(r)
        return h, comm.combine(comm.combine_buffer(), h, num_sms=self.sms)


def traced_phases(per_rank_call, world, streams, comms, replays=3) -> dict:
    """The phase trace (phase_trace.py) of a chain of LONG calls per rank (dispatch + combine,
    or dispatch alone)."""
    step = chained(per_rank_call, world, streams, LONG)
    step()  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay():
        for _ in range(replays):
            graph.replay()
    return phase_trace.summarize(phase_trace.record(comms, replay))


def _dispatch_and_combine(calls_dispatch, calls_pair, world, streams):
    d_us, d_one, _ = per_call_us(calls_dispatch, world, streams)
    dc_us, dc_one, pairs = per_call_us(calls_pair, world, streams)
    return dict(dispatch=d_us, combine=max(dc_us - d_us, 1e-3), dispatch_one_graph=d_one,
                pair_one_graph=dc_one), pairs


def run(world=8, hidden=7168, topk=8, experts=256, out_dir=None, check=True,
        sms_per_rank=DEFAULT_SMS_PER_RANK, token_points=TOKEN_POINTS,
        extra_sms=(4,), trace=False) -> bool:
    device = torch.device("cuda", torch.cuda.current_device())
    ceiling = copy_ceiling_gbps(device)
    records, errors = [], []
    floors, phases = {}, {}
    for tokens in token_points:
        for fp8 in (False, True):
            w = EmulatedWorld(world, tokens, hidden, topk, experts, torch.bfloat16, device,
                              seed=tokens + fp8, ll_tokens=tokens)
            if not floors:
                floors["launch_us"] = launch_us(world, w.streams)
            if fp8 not in floors.setdefault("protocol", {}):  # 0 tokens: launch + flags only
                empty = _Calls(w, sms_per_rank, fp8, 0)
                floors["protocol"][fp8], _ = _dispatch_and_combine(
                    empty.ll_dispatch, empty.ll_pair, world, w.streams)
                if trace:
                    _trace_point(phases, f"0 tokens/rank {'fp8' if fp8 else 'bf16'}",
                                 empty, world, w)
            for comm in w.comms:
                comm.low_latency_combine_buffer().normal_()
            sms_list = (sms_per_rank,) + (tuple(extra_sms) if not fp8 else ())
            for sms in sms_list:
                calls = _Calls(w, sms, fp8, tokens)
                ll, pairs = _dispatch_and_combine(calls.ll_dispatch, calls.ll_pair, world,
                                                  w.streams)
                torch.cuda.synchronize()
                point = f"{tokens} tokens/rank {'fp8' if fp8 else 'bf16'}"
                if check and sms == sms_per_rank:
                    errors += [f"{point}: {e}" for e in _check(w, pairs, fp8)]
                if trace and sms == sms_per_rank:
                    _trace_point(phases, point, calls, world, w)
                tp = {}
                if not fp8 and sms == sms_per_rank:
                    tp, _ = _dispatch_and_combine(calls.tp_dispatch, calls.tp_pair, world,
                                                  w.streams)
                records += _records(w, tokens, fp8, sms, ll, tp, floors, ceiling, hidden)
            base = torch_baseline(world, tokens, hidden, topk, experts, torch.bfloat16, device)
            for rec in records:
                if rec["tokens"] == tokens and rec["fp8"] == fp8:
                    rec["torch_us"] = base[rec["op"]] * 1e3
            w.free()
    _report(records, floors, ceiling, world, sms_per_rank, out_dir, phases)
    for e in errors[:10]:
        print("CHECK FAILED:", e)
    print("low-latency check:", "passed" if not errors else "FAILED")
    return not errors


def _trace_point(phases, point, calls, world, w):
    """Traces the dispatch + combine chain, and the dispatch-only chain the dispatch time comes
    from (its calls start as the previous dispatch ends, not as a combine ends)."""
    phases[point] = traced_phases(calls.ll_pair, world, w.streams, w.comms)
    print(phase_trace.format_summary(f"{point}, {calls.sms} SMs/rank", phases[point]),
          flush=True)
    key = f"{point}, dispatch chain"
    phases[key] = traced_phases(calls.ll_dispatch, world, w.streams, w.comms)
    print(phase_trace.format_summary(f"{key}, {calls.sms} SMs/rank", phases[key]), flush=True)


def _records(w, tokens, fp8, sms, ll, tp, floors, ceiling, hidden):
    # FP8 calls quantize inside dispatch: they read the bf16 token and write FP8 rows + scales.
    row_d = fp8_row_bytes(hidden) if fp8 else hidden * 2
    bytes_floor = dict(
        dispatch=sum(dispatch_min_bytes(r, row_d, hidden * 2) for r in w.routing)
        / (ceiling * 1e9) * 1e6,
        combine=sum(combine_min_bytes(r, hidden * 2) for r in w.routing) / (ceiling * 1e9) * 1e6)
    proto = floors["protocol"][fp8]
    out = []
    for op in ("dispatch", "combine"):
        out.append(dict(
            op=op, tokens=tokens, fp8=fp8, sms_per_rank=sms, us=ll[op],
            bytes_floor_us=bytes_floor[op], ratio=ll[op] / bytes_floor[op],
            protocol_us=proto[op], launch_us=floors["launch_us"],
            throughput_us=tp.get(op, float("nan")),
            one_call_graph_us=ll["dispatch_one_graph"] if op == "dispatch"
            else ll["pair_one_graph"]))
    return out


def _report(records, floors, ceiling, world, sms_per_rank, out_dir, phases):
    headers = ["op", "tokens/rank", "dtype", "SMs/rank", "time us", "bytes floor us",
               "time/bytes floor", "protocol us (0 tok)", "throughput-path us", "plain torch us",
               "one-call graph us"]
    rows = [[r["op"], r["tokens"], "fp8" if r["fp8"] else "bf16", r["sms_per_rank"], r["us"],
             r["bytes_floor_us"], f"{r['ratio']:.2f}", r["protocol_us"], r["throughput_us"],
             r.get("torch_us", float("nan")), r["one_call_graph_us"]] for r in records]
    print(f"\nlow-latency schedule, {world} ranks emulated, per call inside CUDA graphs "
          f"(chain slope, {SHORT} vs {LONG} calls per rank); copy {ceiling:.0f} GB/s "
          f"(read + write); kernel launch in a graph {floors['launch_us']:.2f} us")
    print(format_table(headers, rows))
    print("one-call graph us: a graph of a single call per rank, fork/join of the emulated "
          "ranks included (dispatch alone; dispatch + combine for the combine rows)")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "low_latency.json"), "w") as f:
            json.dump(dict(ceiling_gbps=ceiling, world=world, default_sms_per_rank=sms_per_rank,
                           launch_us=floors["launch_us"],
                           protocol_us={("fp8" if k else "bf16"): v
                                        for k, v in floors["protocol"].items()},
                           records=records, phases=phases), f, indent=1)


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
