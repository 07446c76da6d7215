"""Low-latency (decode) schedule on the one-process emulated world (emulated_world.py), timed
inside CUDA graphs.

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

from . import phase_trace
from .emulated_world import EmulatedWorld
from .metrics import combine_min_bytes, dispatch_min_bytes, format_table, fp8_row_bytes
from .timing import copy_ceiling_gbps, fork_join, graph_ms
from .torch_baseline import torch_baseline_ms

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


def _dispatch_and_combine(w: EmulatedWorld, calls_dispatch, calls_pair):
    """Per-call us of dispatch (its chain) and combine (the dispatch + combine chain minus the
    dispatch chain), and every rank's last (dispatch result, combine output). The combines read
    the fake expert's outputs of the dispatch chain's results."""
    d_us, d_one, handles = per_call_us(calls_dispatch, w.world, w.streams)
    w.fill_combine_windows(handles)
    dc_us, dc_one, pairs = per_call_us(calls_pair, w.world, w.streams)
    return dict(dispatch=d_us, combine=max(dc_us - d_us, 1e-3), dispatch_one_graph=d_one,
                pair_one_graph=dc_one), pairs


def run(world=8, hidden=7168, topk=8, experts=256, out_dir=None, check=True,
        sms_per_rank=DEFAULT_SMS_PER_RANK, token_points=TOKEN_POINTS,
        extra_sms=(4,), trace=False) -> bool:
    device = torch.device("cuda", torch.cuda.current_device())
    ceiling = copy_ceiling_gbps(device)
    print(f"low-latency schedule: {world} ranks emulated, {list(token_points)} tokens/rank, "
          f"bf16 and fp8, {sms_per_rank} SMs/rank", flush=True)
    records, errors = [], []
    floors, phases = {}, {}
    for tokens in token_points:
        for fp8 in (False, True):
            w = EmulatedWorld(world, tokens, hidden, topk, experts, torch.bfloat16, device,
                              seed=tokens + fp8, ll_tokens=tokens)
            _measure_floors(w, fp8, sms_per_rank, floors, phases if trace else None)
            sms_list = (sms_per_rank,) + (tuple(extra_sms) if not fp8 else ())
            point_records = []
            for sms in sms_list:
                recs, errs = _measure_point(w, fp8, sms, sms == sms_per_rank, floors, ceiling,
                                            check, phases if trace else None)
                point_records += recs
                errors += errs
            base = torch_baseline_ms(world, tokens, hidden, topk, experts, torch.bfloat16,
                                     device)
            for rec in point_records:
                rec["torch_us"] = base[rec["op"]] * 1e3
            records += point_records
            w.free()
    _report(records, floors, ceiling, world, sms_per_rank, out_dir, phases)
    for e in errors[:10]:
        print("CHECK FAILED:", e)
    print("low-latency check:", "passed" if not errors else "FAILED")
    return not errors


def _measure_floors(w, fp8, sms, floors, phases):
    """Once per run: the launch of one kernel in a graph; once per dtype: the protocol (the
    calls with 0 tokens: launch + flags only), traced too when phases is a dict."""
    if not floors:
        floors["launch_us"] = launch_us(w.world, w.streams)
    if fp8 not in floors.setdefault("protocol", {}):
        empty = _Calls(w, sms, fp8, 0)
        floors["protocol"][fp8], _ = _dispatch_and_combine(w, empty.ll_dispatch, empty.ll_pair)
        if phases is not None:
            _trace_point(phases, f"0 tokens/rank {'fp8' if fp8 else 'bf16'}", empty, w.world, w)


def _measure_point(w, fp8, sms, main, floors, ceiling, check, phases) -> tuple[list, list]:
    """(records, check errors) of the low-latency calls at sms SMs per rank. At the run's main
    SM budget (main) also: the check (if check), the trace (if phases is a dict) and, in bf16,
    the throughput calls at the same shape."""
    calls = _Calls(w, sms, fp8, w.tokens)
    ll, pairs = _dispatch_and_combine(w, calls.ll_dispatch, calls.ll_pair)
    torch.cuda.synchronize()
    point = f"{w.tokens} tokens/rank {'fp8' if fp8 else 'bf16'}"
    check = check and main
    errors = [f"{point}: {e}" for e in w.check(pairs, (0, w.world - 1), fp8)] if check else []
    if main and phases is not None:
        _trace_point(phases, point, calls, w.world, w)
    tp = {}
    if not fp8 and main:
        tp, _ = _dispatch_and_combine(w, calls.tp_dispatch, calls.tp_pair)
    print(f"  {point}, {sms} SMs/rank: dispatch {ll['dispatch']:.2f} us, combine "
          f"{ll['combine']:.2f} us" + (f", check {'passed' if not errors else 'FAILED'}"
                                      if check else ""), flush=True)
    return _records(w, w.tokens, fp8, sms, ll, tp, floors, ceiling, w.hidden), errors


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
