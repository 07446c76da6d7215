"""The pipelined MoE layer: a batch cut into chunks whose communication hides behind the
experts of other chunks (FinDEP), on the schedule the solver chose.

Two Communicators of the same configuration take the chunks in turn (chunk i uses
comms[i % 2]), so dispatch i + 1 can land while chunk i's rows are still in use. One
communication stream runs every dispatch and combine, in the order `schedule.py` models
(D1 D2 C1 D3 C2 ...), the caller's stream the experts (and the shared expert); events carry
each dependency across. The routing is computed once for the whole batch, and chunking never
changes a token's math (its top-k rows and their float32 sum), so the output equals the
unpipelined layer's for the same routing. On CPU everything runs in issue order.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..communicator import Communicator
from ..moe import ExpertParallelMoE
from .schedule import Schedule


class _Streams:
    """The communication stream and the events between it and the caller's stream (CUDA);
    on CPU, plain calls in issue order."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.comm = torch.cuda.Stream(device) if self.cuda else None

    def on_comm(self, fn: Callable, uses: Sequence[torch.Tensor] = ()):
        """fn() on the communication stream, after the caller's queued work; returns (result,
        event the caller's stream can wait for). uses: tensors of the caller's stream that fn
        reads (kept from reuse until the communication stream is done with them)."""
        if not self.cuda:
            return fn(), None
        self.comm.wait_stream(torch.cuda.current_stream())
        for t in uses:
            t.record_stream(self.comm)
        with torch.cuda.stream(self.comm):
            result = fn()
        event = torch.cuda.Event()
        event.record(self.comm)
        return result, event

    def join(self, event, tensors: Sequence[torch.Tensor] = ()) -> None:
        """The caller's stream waits for event; tensors made on the comm stream are used here."""
        if event is None:
            return
        torch.cuda.current_stream().wait_event(event)
        for t in tensors:
            t.record_stream(torch.cuda.current_stream())


class PipelinedMoE(nn.Module):
    """moe's layer (router, grouped experts) plus an optional shared expert, run as chunks.

    comms: two Communicators built with moe.comm's configuration (moe.comm may be one of them).
    shared: a module applied to every token and added to the output (DeepSeek-V3 / Qwen3-MoE
        shared experts); it fills the compute stream while the first dispatch runs.
    forward(x, schedule): x [num_tokens, hidden]; schedule.chunks must sum to num_tokens.
    """

    def __init__(self, moe: ExpertParallelMoE, comms: Sequence[Communicator],
                 shared: Optional[nn.Module] = None):
        super().__init__()
        if len(comms) != 2 or comms[0] is comms[1]:
            raise ValueError("PipelinedMoE takes two distinct Communicators (their workspaces "
                             f"alternate between chunks), got {len(comms)}")
        for c in comms:
            if c.config != moe.comm.config or c.world_size != moe.comm.world_size:
                raise ValueError("both Communicators must have the layer's configuration "
                                 f"({moe.comm.config}), got {c.config}")
        self.moe, self.comms, self.shared = moe, tuple(comms), shared
        self._streams = _Streams(moe.comm.device)
        self.tracer = None  # a TaskTracer: record when every task ran (the benchmark's timeline)

    def _span(self, stream: str, name: str, chunk: int):
        return self.tracer.span(stream, name, chunk) if self.tracer else contextlib.nullcontext()

    def forward(self, x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        if sum(schedule.chunks) != x.size(0) or min(schedule.chunks) <= 0:
            raise ValueError(f"schedule.chunks={list(schedule.chunks)} must be positive and sum "
                             f"to the batch's {x.size(0)} tokens")
        idx, weights = self.moe.route(x)
        bounds = torch.tensor((0,) + tuple(schedule.chunks)).cumsum(0).tolist()
        parts = [(x[a:b], idx[a:b], weights[a:b]) for a, b in zip(bounds, bounds[1:])]
        return torch.cat(self._run(x, parts, schedule))

    def _dispatch(self, i: int, parts, sms: int):
        comm = self.comms[i % 2]
        method = comm.low_latency_dispatch if self.moe.low_latency else comm.dispatch

        def call():
            with self._span("comm", "dispatch", i):
                return method(*parts[i], num_sms=sms)
        return self._streams.on_comm(call, parts[i])

    def _combine(self, i: int, out: torch.Tensor, handle, sms: int):
        comm = self.comms[i % 2]
        method = comm.low_latency_combine if self.moe.low_latency else comm.combine

        def call():
            with self._span("comm", "combine", i):
                return method(out, handle, num_sms=sms)
        return self._streams.on_comm(call, (out,))

    def _experts(self, i: int, handle) -> torch.Tensor:
        with self._span("compute", "experts", i):
            if self.moe.low_latency:
                return self.moe.experts_low_latency(handle.recv_x)
            return self.moe.experts(handle.recv_x, handle.expert_offsets[1:])

    def _shared(self, i: int, x: torch.Tensor) -> torch.Tensor:
        with self._span("compute", "shared", i):
            return self.shared(x)

    def _run(self, x: torch.Tensor, parts, schedule: Schedule) -> list:
        """The streams in the order schedule.py models: D1 D2 C1 D3 C2 ... on the communication
        stream; [S] X1 X2 ... or S1 X1 S2 X2 ... on the caller's."""
        k, sms = len(parts), schedule.comm_sms
        interleaved = schedule.order == "interleaved"
        pending = {i: self._dispatch(i, parts, sms) for i in range(min(2, k))}
        shared = None
        if self.shared is not None and not interleaved:  # fills the first dispatch's wait
            shared = self._shared(0, x)
        combined = []
        for i in range(k):
            shared_i = self._shared(i, parts[i][0]) if self.shared is not None and interleaved \
                else None
            handle, event = pending.pop(i)
            self._streams.join(event, _tensors(handle))
            combined.append((self._combine(i, self._experts(i, handle), handle, sms), shared_i))
            if i + 2 < k:
                pending[i + 2] = self._dispatch(i + 2, parts, sms)
        outputs = []
        for (y, event), shared_i in combined:  # the caller's stream waits only at the end
            self._streams.join(event, (y,))
            outputs.append(y if shared_i is None else y + shared_i)
        if shared is not None:
            outputs = list(torch.cat(outputs).add_(shared).split(list(schedule.chunks)))
        return outputs


def _tensors(handle) -> list:
    return [t for t in handle if isinstance(t, torch.Tensor)]
