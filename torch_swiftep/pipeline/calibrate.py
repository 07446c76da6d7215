"""Measured task times of a PipelinedMoE on its own device: the cost model's samples.

Every task is timed through the code path the layer runs (`PipelinedMoE.expert_outputs`,
`shared_outputs`, the Communicators' dispatch and combine), at each size and SM budget:

- dispatch and combine alone, at each communication budget s;
- the experts and the shared expert alone on the whole GPU (Sample comm_sms = 0) and BESIDE a
  running communication kernel: dispatch/combine pairs of the layer's second Communicator are
  launched first on the layer's communication stream at s SMs, the GEMMs start once the first
  combine is reached and are timed on the caller's stream while communication keeps going, with
  the layer's carve-out at s (Sample comm_sms = s). The cost model fits its interference term
  from the difference instead of assuming G / (G - s).

On CPU the same calls run one after another (no concurrency): the figures only prove the code
runs. `carveout_effect` checks that the experts' GEMM honours the carve-out at all, and
`experts_breakdown` times the pieces of the experts (what is fixed, what follows the rows).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .cost_model import Sample

# GPU clock cycles per microsecond for torch.cuda._sleep: ~2 GHz, an upper bound on H100/H200
# SM clocks (a slower clock sleeps longer, which only costs a little benchmark time).
SLEEP_CYCLES_PER_US = 2000


def hold_stream(stream, host_us: float) -> None:
    """Keep `stream` busy on the GPU for about 2 * host_us + 50 us (a sleep kernel), so the host
    queues the timed work behind it before any of it runs: the events then bracket device time
    only, as inside a model, where the previous layer's kernels keep the GPU busy while the
    host issues this one."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int((2 * host_us + 50) * SLEEP_CYCLES_PER_US))


def time_us(fn, device: torch.device, iters: int = 5, hold: bool = True) -> float:
    """Median microseconds of fn() (CUDA events on a GPU, the host clock on CPU). hold=False:
    from an idle GPU, so a host slower than the kernels shows in the time (a cold start)."""
    t0 = time.perf_counter()
    fn()
    issue_us = (time.perf_counter() - t0) * 1e6  # the host's issue time (no sync inside)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if hold:
                hold_stream(torch.cuda.current_stream(), issue_us)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


def host_us(fn, device: torch.device, iters: int = 5) -> float:
    """Median host (wall-clock) microseconds to issue fn(), the device idle before each call:
    on a GPU, how long the host needs before the last of fn's work can start. A layer whose
    host time nears its device time keeps the GPU waiting for launches."""
    times = []
    for _ in range(iters + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    times = sorted(times[1:])
    return times[len(times) // 2]


def _beside_once(fn, steps, comm_stream, issue_us: float) -> tuple[float, bool]:
    """fn()'s us on the caller's stream, started once steps[0] (a dispatch) is done on
    comm_stream, the rest of the steps queued behind it there (all of it held until the host
    has queued everything); whether they outlasted fn."""
    caller = torch.cuda.current_stream()
    comm_stream.wait_stream(caller)
    hold_stream(comm_stream, issue_us)
    with torch.cuda.stream(comm_stream):
        steps[0]()
    go = torch.cuda.Event()
    go.record(comm_stream)
    with torch.cuda.stream(comm_stream):
        for step in steps[1:]:
            step()
    end = torch.cuda.Event(enable_timing=True)
    end.record(comm_stream)
    caller.wait_event(go)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3, b.elapsed_time(end) >= 0


def time_beside_us(fn, steps, layer, device: torch.device, iters: int = 5) -> tuple:
    """(median us of fn() beside the communication steps, fraction of runs the communication
    outlasted fn). CPU: fn alone."""
    if device.type != "cuda":
        return time_us(fn, device, iters), 1.0
    t0 = time.perf_counter()
    for step in steps:
        step()
    fn()
    issue_us = (time.perf_counter() - t0) * 1e6
    torch.cuda.synchronize()
    runs = [_beside_once(fn, steps, layer._streams.comm, issue_us) for _ in range(iters)]
    times = sorted(us for us, _ in runs)
    return times[len(times) // 2], sum(covered for _, covered in runs) / len(runs)


def _comm_steps(layer, part, idx, w, sms: int, reps: int) -> list:
    """reps dispatch/combine pairs of the layer's second Communicator (its own windows)."""
    comm = layer.comms[1]
    window = comm.combine_buffer()
    state = {}

    def dispatch():
        state["handle"] = comm.dispatch(part, idx, w, num_sms=sms)

    def combine():
        comm.combine(window, state["handle"], num_sms=sms)
    return [dispatch, combine] * reps


class LocalClock:
    """How measure() times in one process: medians of `iters` runs (CUDA events after a GPU
    hold, the host clock on CPU). A world of processes passes its own clock with the same three
    methods (bench/pipeline_multi_process.py: every rank runs each timed call together)."""

    def __init__(self, device: torch.device, iters: int = 5):
        self.device, self.iters = device, iters

    def time_us(self, fn) -> float:
        return time_us(fn, self.device, self.iters)

    def beside_us(self, fn, steps, layer) -> tuple:
        return time_beside_us(fn, steps, layer, self.device, self.iters)

    def largest(self, n: int) -> int:
        """n, agreed: the largest over the processes that time together (here: one)."""
        return n


def measure(layer, x: torch.Tensor, sizes, sms_options, iters: int = 5,
            split: str = "tokens", clock=None) -> tuple[list, list]:
    """(samples, coverage): the cost model's samples at every size and budget, and for each
    beside-communication sample (task, tokens, s, fraction of runs the communication outlasted
    the GEMMs: below 1 the sample is partly alone). sizes: tokens, or local experts per group
    (split "experts"; samples at the tokens each group stands for, layer.sample_chunk).
    clock: LocalClock(x.device, iters) unless given."""
    clock = clock or LocalClock(x.device, iters)
    comm = layer.comms[0]
    samples, coverage = [], []
    for size in sizes:
        part, idx, w, n = layer.sample_chunk(x, size, split)
        pair_us = {}  # s -> a dispatch/combine pair's us
        for s in sms_options:  # dispatch and combine alone
            def dispatch(s=s):
                return comm.dispatch(part, idx, w, num_sms=s)
            out = layer.expert_outputs(0, dispatch(), part.size(0))
            d = clock.time_us(dispatch)
            pair_us[s] = clock.time_us(lambda s=s: comm.combine(out, dispatch(s), num_sms=s))
            samples += [Sample("dispatch", n, s, d),
                        Sample("combine", n, s, max(pair_us[s] - d, 1e-3))]
        handle = comm.dispatch(part, idx, w, num_sms=sms_options[0])
        work = {"experts": lambda: layer.expert_outputs(0, handle, part.size(0)),
                "shared": lambda: layer.shared(x[:n])}  # per token, whatever the split
        for task in ("experts",) + (("shared",) if layer.shared is not None else ()):
            def carved(task=task, s=0):  # the layer's carve-out for s (0: its alone setting)
                with layer._carve(s):
                    work[task]()
            alone = clock.time_us(carved)
            samples.append(Sample(task, n, 0, alone))
            for s in sms_options:  # beside enough communication to outlast the GEMMs
                reps = clock.largest(2 + math.ceil(2.0 * alone / max(pair_us[s], 1.0)))
                steps = _comm_steps(layer, part, idx, w, s, reps)
                us, covered = clock.beside_us(lambda task=task, s=s: carved(task, s), steps,
                                              layer)
                samples.append(Sample(task, n, s, us))
                coverage.append((task, n, s, covered))
        if split == "experts":  # the layer's merge, over n tokens (priced at all of them)
            samples.append(Sample("merge", n, 0, clock.time_us(merge_step(x[:n])[0])))
    return samples, coverage


def merge_step(y: torch.Tensor) -> tuple:
    """(add, total): add() adds y into a float32 total as the layer merges a chunk of experts'
    combine (layer.py, _merge)."""
    total = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    return (lambda: total.add_(y)), total


def interference(samples, total_sms: int) -> dict:
    """task -> s -> (measured mean beside/alone time ratio, the ideal G / (G - s))."""
    alone = {(r.task, r.tokens): r.us for r in samples if r.comm_sms == 0}
    ratios: dict = {}
    for r in samples:
        if r.comm_sms > 0 and (r.task, r.tokens) in alone:
            ratios.setdefault(r.task, {}).setdefault(r.comm_sms, []).append(
                r.us / alone[(r.task, r.tokens)])
    return {task: {s: (sum(v) / len(v), total_sms / (total_sms - s))
                   for s, v in sorted(by.items())} for task, by in ratios.items()}


def carveout_effect(layer, x: torch.Tensor, total_sms: int, iters: int = 5):
    """(experts' time with half the SMs carved out) / (without), alone, at x's size: ~2 when
    the grouped GEMM honours the carve-out, ~1 when it ignores it. None on CPU or without it."""
    from .carveout import carveout_supported, sm_carveout
    if x.device.type != "cuda" or not carveout_supported():
        return None
    idx, w = layer.moe.route(x)
    handle = layer.comms[0].dispatch(x, idx, w)

    def run(sms):
        with sm_carveout(sms):
            layer.expert_outputs(0, handle, x.size(0))
    return time_us(lambda: run(total_sms // 2), x.device, iters) / \
        time_us(lambda: run(0), x.device, iters)


def experts_breakdown(layer, x: torch.Tensor, n: int, iters: int = 5) -> dict:
    """us of the experts' pieces for an n-token chunk: ExpertParallelMoE.experts over the whole
    window (what the layer ran before bound rows), the layer's path, and its pieces over the
    chunk's rows (gate/up GEMM, SwiGLU, down GEMM, copy into the combine window); plus the
    bytes of expert weights every chunk streams once (a lower bound on its GEMMs' time)."""
    moe, device = layer.moe, x.device
    part = x[:n]
    idx, w = moe.route(part)
    handle = layer.comms[0].dispatch(part, idx, w)
    offs, rows = handle.expert_offsets[1:], layer.row_bound(n)
    recv = handle.recv_x[:rows]
    gate_up = torch._grouped_mm(recv, moe.w_gate_up, offs=offs)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    y = torch._grouped_mm(hidden, moe.w_down, offs=offs)
    window = layer.comms[0].combine_buffer(y.dtype)
    out = {
        "tokens": n, "rows": rows, "capacity": handle.recv_x.size(0),
        "whole_window_us": time_us(lambda: moe.experts(handle.recv_x, offs), device, iters),
        "layer_path_us": time_us(lambda: layer.expert_outputs(0, handle, n), device, iters),
        "gate_up_gemm_us": time_us(lambda: torch._grouped_mm(recv, moe.w_gate_up, offs=offs),
                                   device, iters),
        "swiglu_us": time_us(lambda: F.silu(gate) * up, device, iters),
        "down_gemm_us": time_us(lambda: torch._grouped_mm(hidden, moe.w_down, offs=offs),
                                device, iters),
        "copy_us": time_us(lambda: window[:rows].copy_(y), device, iters),
        "weight_bytes": (moe.w_gate_up.numel() + moe.w_down.numel()) * moe.w_down.element_size(),
    }
    return out
