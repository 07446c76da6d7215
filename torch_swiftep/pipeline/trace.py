"""When each task of a layer's forward ran, per stream: the measured timeline the benchmark sets
beside the solver's predicted one (CUDA events, read after a sync; the host clock on CPU)."""
from __future__ import annotations

import contextlib
import time

import torch

from .schedule import Task


class TaskTracer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []

    @contextlib.contextmanager
    def span(self, stream: str, name: str, chunk: int):
        """Around work issued on the current stream (CUDA) or run now (CPU)."""
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.spans.append((stream, name, chunk, start, end))

    def timeline(self) -> list[Task]:
        """The recorded tasks in microseconds from the first start (syncs on CUDA)."""
        if not self.spans:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            origin = self.spans[0][3]  # the first recorded start; times may precede it

            def stamp(event):
                return origin.elapsed_time(event) * 1e3
        else:
            def stamp(seconds):
                return seconds * 1e6
        raw = [(st, n, c, stamp(a), stamp(b)) for st, n, c, a, b in self.spans]
        first = min(r[3] for r in raw)
        tasks = [Task(st, n, c, a - first, b - first) for st, n, c, a, b in raw]
        return sorted(tasks, key=lambda t: (t.start_us, t.stream))
