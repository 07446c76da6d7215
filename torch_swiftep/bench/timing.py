"""CUDA timing for the GPU benchmarks: events around eager calls, CUDA-graph replays, the
fork/join of emulated ranks' streams and the device-to-device copy rate they are compared with."""
from __future__ import annotations

from typing import Callable

import torch

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
