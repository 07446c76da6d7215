"""Timing ranks that are processes, aligned on the device rather than by a host barrier (the
multi-process benchmark and its peers): each rank captures chains of SHORT and LONG back-to-back
calls in CUDA graphs and replays each after a host barrier; the per-call time is the slope
between the two chains, since every call waits for every peer on the device and the start skew
cancels."""
from __future__ import annotations

from statistics import median

SHORT, LONG = 2, 10  # calls per chain (per rank, per CUDA graph)
REPEATS = 5  # timed replays of each chain (median)


def chain_slope(t_short: float, t_long: float, short: int = SHORT, long: int = LONG) -> float:
    """Per-call time from two chain times: what the LONG - SHORT extra calls cost each."""
    if long <= short:
        raise ValueError(f"the long chain must be longer than the short one: {short}, {long}")
    return (t_long - t_short) / (long - short)


def capture_chains(call, chain=(SHORT, LONG)) -> list:
    """One eager call (every rank: it communicates), then one CUDA graph per chain length, each
    of that many back-to-back calls. Nothing runs while capturing."""
    import torch

    call()
    torch.cuda.synchronize()
    graphs = []
    for layers in chain:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(layers):
                call()
        graphs.append(graph)
    return graphs


def measure_chains(graphs, barrier, repeats=REPEATS, chain=(SHORT, LONG)) -> dict:
    """Replays each chain graph after a host barrier, timed with CUDA events (one untimed round
    first: graph upload). Returns the medians, the samples and the per-call slope (ms)."""
    import torch

    samples = {n: [] for n in chain}
    for round_ in range(repeats + 1):
        for layers, graph in zip(chain, graphs):
            barrier()
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            if round_:
                samples[layers].append(start.elapsed_time(end))
    short, long = chain
    t_short, t_long = median(samples[short]), median(samples[long])
    return dict(short_ms=t_short, long_ms=t_long, samples=samples,
                slope_ms=chain_slope(t_short, t_long, short, long))


def after_failed_capture() -> None:
    """Back to a usable state after a capture that raised on some rank: the default stream
    current again and the graphs' private pools returned (other processes share the GPU)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_stream(torch.cuda.default_stream())
    torch.cuda.empty_cache()


def agree(ok, group) -> list:
    """Every rank's value of ok (gloo all_gather_object), in rank order."""
    import torch.distributed as dist

    every = [None] * group.size()
    dist.all_gather_object(every, ok, group)
    return every


def time_dispatch_and_step(group, graphed, eager, chain=(SHORT, LONG),
                           repeats=REPEATS) -> tuple[str | None, dict]:
    """A peer's {dispatch, combine, step} ms per call on this rank. graphed: (dispatch, step)
    calls that can be captured (chained graphs, as swiftep is timed); if any rank cannot
    capture them, every rank times eager: (dispatch, step) with CUDA events after a host barrier
    instead. Returns (None, ops) when chained, (why capture failed, ops) otherwise."""
    import torch
    import torch.distributed as dist

    from .timing import time_fn

    graphs, reason = None, None
    try:  # capture on every rank first; replay only if every rank could
        graphs = [capture_chains(call, chain) for call in graphed]
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        torch.cuda.synchronize()
    failed = [r for r in agree(reason, group) if r]

    def barrier():
        dist.barrier(group)

    if not failed:
        d, s = (measure_chains(g, barrier, repeats, chain)["slope_ms"] for g in graphs)
        return None, dict(dispatch=d, combine=s - d, step=s)
    del graphs
    after_failed_capture()

    def together():
        barrier()
        torch.cuda.synchronize()

    d, s = (time_fn(call, before=together) for call in eager)
    return failed[0][:200], dict(dispatch=d, combine=s - d, step=s)
