"""The pipelined MoE layer: a batch cut into chunks whose communication hides behind the
experts of other chunks (FinDEP), on the schedule the solver chose.

Two Communicators of the same configuration take the chunks in turn (chunk i uses
comms[i % 2]), so dispatch i + 1 can land while chunk i's rows are still in use. One
communication stream runs every dispatch and combine, in the order `schedule.py` models
(D1 D2 C1 D3 C2 ...), the caller's stream the experts (and the shared expert); events carry
each dependency across. The routing is computed once for the whole batch. Chunks of tokens
never change a token's math (its top-k rows and their float32 sum), so the output equals the
unpipelined layer's for the same routing, bit for bit; chunks of experts split a token's sum by
expert group (a merge per chunk on the caller's stream, rounded once), so theirs equals it to
rounding. On CPU everything runs in issue order.

What keeps the two streams from slowing each other down on a GPU (docs/pipelining.md):
- the GEMMs that run beside communication are given only the SMs it leaves (carveout.py), as
  `schedule.compute_sms` says and the cost model prices;
- the communication stream has a high priority, and each chunk's experts wait until the
  combine they overlap has been reached on the communication stream, so the communication
  kernel is launched first and its blocks are placed first;
- the host issues work that waits for nothing first: the shared expert before the dispatches
  (the compute stream starts at once instead of after two dispatch calls' host time);
- the experts of a chunk run over the rows that chunk can have, not over the whole window
  (`expert_outputs`; by default in a world of one, where that bound is exact), so their cost
  follows the chunk, not the Communicator's capacity; everywhere, their SwiGLU stops at the
  rows the window holds (`swiglu_rows`, read on the device).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..communicator import Communicator
from ..moe import ExpertParallelMoE
from .carveout import sm_carveout
from .schedule import Schedule, compute_sms

# A stream priority above the default (0; lower is higher, torch clamps it to the device's
# range): when SMs free up, the communication kernels' blocks are placed before the GEMMs'.
COMM_STREAM_PRIORITY = -1


class _Streams:
    """The communication stream and the events between it and the caller's stream (CUDA);
    on CPU, plain calls in issue order."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.comm = torch.cuda.Stream(device, priority=COMM_STREAM_PRIORITY) if self.cuda \
            else None

    def mark(self):
        """An event after the work queued so far on the caller's stream (None on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def on_comm(self, fn: Callable, uses: Sequence[torch.Tensor] = (), after=None):
        """fn() on the communication stream after `after` (an event of the caller's stream;
        None: all the caller's queued work). Returns (result, started, done): events for when
        the communication stream reached fn's kernels and when it finished them. uses:
        tensors of the caller's stream that fn reads (kept from reuse until it is done)."""
        if not self.cuda:
            return fn(), None, None
        self.comm.wait_event(after if after is not None else self.mark())
        for t in uses:
            t.record_stream(self.comm)
        started, done = torch.cuda.Event(), torch.cuda.Event()
        started.record(self.comm)
        with torch.cuda.stream(self.comm):
            result = fn()
        done.record(self.comm)
        return result, started, done

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
    carveout: give the GEMMs beside communication only the SMs it leaves (CUDA, when torch has
        the setting; carveout.py). False: the GEMMs always see the whole GPU.
    bound_rows: run the throughput experts over the rows a chunk can have instead of the whole
        window (see expert_outputs). Needs every rank to run the same chunks (a device-side
        assert checks it). False: over the whole window, as ExpertParallelMoE does. None (the
        default): in a world of one only, where the bound is the chunk's exact row count; with
        W ranks it is W times the average, and the copy into the combine window would move
        more bytes than the combine's own staging of the valid rows.
    forward(x, schedule): x [num_tokens, hidden]. schedule.split "tokens": schedule.chunks
        (tokens) sum to num_tokens; the output equals the unpipelined layer's bit for bit.
        "experts" (throughput schedule only): schedule.chunks (local experts per group, in
        the order of the experts' indices) sum to the rank's local experts; chunk i
        dispatches every token's slots whose expert is in group i of its owner's experts (the
        others set to -1), so each expert runs once over all its rows, and the output is the
        float32 sum of the chunks' combines, rounded once: the unpipelined layer's value up to
        rounding (a token's slots are summed group by group, each group's sum rounded to the
        output dtype), not bit for bit.
    """

    def __init__(self, moe: ExpertParallelMoE, comms: Sequence[Communicator],
                 shared: Optional[nn.Module] = None, *, carveout: bool = True,
                 bound_rows: Optional[bool] = None):
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
        cfg, comm = moe.comm.config, moe.comm
        self.carveout = carveout
        self.bound_rows = comm.world_size == 1 if bound_rows is None else bound_rows
        # rows one token can put in a rank's window per source rank: one per distinct expert
        self._rows_per_token = comm.world_size * min(cfg.num_topk, comm.num_local_experts)
        self._windows: dict = {}
        self.tracer = None  # a TaskTracer: record when every task ran (the benchmark's timeline)

    def _span(self, stream: str, name: str, chunk: int):
        return self.tracer.span(stream, name, chunk) if self.tracer else contextlib.nullcontext()

    def _carve(self, sms: int):
        return sm_carveout(sms) if self.carveout and self._streams.cuda else \
            contextlib.nullcontext()

    def forward(self, x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        idx, weights = self.moe.route(x)
        if schedule.split == "experts":
            return self._run(x, self.expert_parts(x, idx, weights, schedule.chunks),
                             schedule)[0]
        chunks = schedule.chunks
        if sum(chunks) != x.size(0) or min(chunks) <= 0:
            raise ValueError(f"schedule.chunks={list(chunks)} must be positive and sum "
                             f"to the batch's {x.size(0)} tokens")
        parts, start = [], 0
        for n in chunks:
            parts.append((x[start:start + n], idx[start:start + n], weights[start:start + n]))
            start += n
        return torch.cat(self._run(x, parts, schedule))

    def expert_parts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                     groups) -> list:
        """(x, idx, weights) of each chunk of experts: groups[i] consecutive local experts of
        every rank form group i; a slot whose expert is in another group is set to -1."""
        local = self.moe.comm.num_local_experts
        if self.moe.low_latency:
            raise ValueError("chunks of experts need the throughput schedule: the low-latency "
                             "window runs every expert over its static rows whatever they hold")
        if sum(groups) != local or min(groups) <= 0:
            raise ValueError(f"schedule.chunks={list(groups)} (chunks of experts) must be "
                             f"positive and sum to the rank's {local} local experts")
        # group of each slot's expert, from Python ints only (no host-to-device copy, which a
        # CUDA graph could not capture)
        expert = idx.clamp(min=0) % local
        group = torch.zeros_like(idx)
        for start in itertools.accumulate(groups[:-1]):
            group += expert >= start
        group = torch.where(idx >= 0, group, -1)
        hole = torch.full_like(idx, -1)
        return [(x, torch.where(group == i, idx, hole), weights) for i in range(len(groups))]

    def sample_chunk(self, x: torch.Tensor, size: int, split: str = "tokens") -> tuple:
        """(x, topk_idx, topk_weights, tokens) of one chunk of `size` as forward cuts it, for
        calibration: the first `size` tokens, or (split "experts") every token's slots in the
        first `size` local experts of each rank; tokens: what the chunk stands for in the cost
        model (Schedule.work)."""
        if split == "experts":
            local = self.moe.comm.num_local_experts
            idx, w = self.moe.route(x)
            groups = (size,) + ((local - size,) if size < local else ())
            part, idx, w = self.expert_parts(x, idx, w, groups)[0]
            return part, idx, w, max(1, round(x.size(0) * size / local))
        part = x[:size]
        return (part, *self.moe.route(part), size)

    def row_bound(self, tokens: int) -> int:
        """Most rows a chunk of `tokens` tokens per rank (on every rank) puts in a window."""
        return min(self.moe.comm.plan.capacity, tokens * self._rows_per_token)

    def expert_outputs(self, i: int, handle, tokens: int) -> torch.Tensor:
        """Chunk i's experts over its dispatch handle (comms[i % 2]'s): what its combine takes.

        With bound_rows (throughput schedule) the grouped GEMMs and the SwiGLU between them run
        over the first row_bound(tokens) rows of the window: ExpertParallelMoE.experts over the
        whole window would compute the SwiGLU over every capacity row (and size its GEMM
        outputs by capacity) whatever the chunk's size. Its [rows, hidden] output is then
        copied into this Communicator's combine window (combine_buffer(): the combine makes no
        copy of its own), since combine takes [capacity, hidden] rows."""
        moe = self.moe
        if moe.low_latency:
            return moe.experts_low_latency(handle.recv_x)
        offs = handle.expert_offsets[1:]
        if not self.bound_rows:
            return moe.experts(handle.recv_x, offs)
        rows = self.row_bound(tokens)
        torch._assert_async(offs[-1] <= rows, "PipelinedMoE: a chunk received more rows than "
                            "its bound: every rank must run the same schedule.chunks (or build "
                            "the layer with bound_rows=False)")
        y = moe.experts(handle.recv_x[:rows], offs)
        key = (i % 2, y.dtype)
        if key not in self._windows:
            self._windows[key] = self.comms[i % 2].combine_buffer(y.dtype)
        window = self._windows[key]
        window[:rows].copy_(y)
        return window

    def shared_outputs(self, x: torch.Tensor, comm_sms: int) -> torch.Tensor:
        """The shared expert over x, its GEMMs confined as beside communication at comm_sms."""
        with self._carve(comm_sms):
            return self.shared(x)

    def _dispatch(self, i: int, parts, sms: int, routed):
        comm = self.comms[i % 2]
        method = comm.low_latency_dispatch if self.moe.low_latency else comm.dispatch

        def call():
            with self._span("comm", "dispatch", i):
                return method(*parts[i], num_sms=sms)
        return self._streams.on_comm(call, parts[i], after=routed)

    def _combine(self, i: int, out: torch.Tensor, handle, sms: int):
        comm = self.comms[i % 2]
        method = comm.low_latency_combine if self.moe.low_latency else comm.combine

        def call():
            with self._span("comm", "combine", i):
                return method(out, handle, num_sms=sms)
        # No record_stream on out: under CUDA-graph capture the allocator keeps such blocks
        # until the capture ends (a whole window per chunk); _run keeps out alive instead.
        return self._streams.on_comm(call)

    def _experts(self, i: int, handle, tokens: int, sms: int) -> torch.Tensor:
        with self._span("compute", "experts", i), self._carve(sms):
            return self.expert_outputs(i, handle, tokens)

    def _shared(self, i: int, x: torch.Tensor, sms: int) -> torch.Tensor:
        with self._span("compute", "shared", i):
            return self.shared_outputs(x, sms)

    def _join(self, y: torch.Tensor, done) -> torch.Tensor:
        self._streams.join(done, (y,))
        return y

    def _merge(self, i: int, y: torch.Tensor, done, total: list) -> None:
        """Chunks of experts: adds chunk i's combine into the float32 total on the caller's
        stream, once that combine is done (issued after the next chunk's experts, beside
        which it ran, so the add waits for nothing in the usual case). The sum is rounded
        once, at the end; chunk order, so every call adds in the same order."""
        with self._span("compute", "merge", i):
            self._join(y, done)
            if total:
                total[0] += y
            else:
                total.append(y.float())

    def _run(self, x: torch.Tensor, parts, schedule: Schedule) -> list:
        """The streams in the order schedule.py models: D1 D2 C1 D3 C2 ... on the communication
        stream; [S] X1 X2 ... or S1 X1 S2 X2 ... on the caller's."""
        k, sms = len(parts), schedule.comm_sms
        interleaved = schedule.order == "interleaved"
        routed = self._streams.mark()  # the dispatches wait for the routing only
        shared = {}
        if self.shared is not None:  # issued first: it waits for nothing
            shared[0] = self._shared(0, parts[0][0] if interleaved else x,
                                     compute_sms("shared", k, sms))
        pending = {i: self._dispatch(i, parts, sms, routed) for i in range(min(2, k))}
        combined, started, outs = [], None, {}
        groups, total = schedule.split == "experts", []  # chunks of experts: a float32 sum
        for i in range(k):
            if self.shared is not None and interleaved and i > 0:
                shared[i] = self._shared(i, parts[i][0], compute_sms("shared", k, sms))
            handle, _, landed = pending.pop(i)
            self._streams.join(landed, _tensors(handle))
            # dispatch i was queued after combine i - 2 on the communication stream: once the
            # caller's stream has waited for it, combine i - 2 has read its experts' outputs
            outs.pop(i - 2, None)
            self._streams.join(started)  # combine i - 1's kernels are launched first
            out = self._experts(i, handle, parts[i][0].size(0), compute_sms("experts", k, sms))
            outs[i] = out
            y, started, combined_event = self._combine(i, out, handle, sms)
            combined.append((y, combined_event))
            if groups and i > 0:  # chunk i - 1's combine ran beside these experts
                self._merge(i - 1, *combined[i - 1], total)
            if i + 2 < k:
                pending[i + 2] = self._dispatch(i + 2, parts, sms, routed)
        if groups:  # k == 1: the unpipelined layer's calls exactly
            if k > 1:
                self._merge(k - 1, *combined[-1], total)
            y = total[0].to(x.dtype) if k > 1 else self._join(*combined[0])
            outs.clear()  # every combine has been joined: their inputs may be reused
            return [y + shared[0] if shared else y]
        outputs = []
        for i, (y, done) in enumerate(combined):  # the caller's stream waits only at the end
            self._streams.join(done, (y,))
            outputs.append(y + shared[i] if interleaved and i in shared else y)
        outs.clear()  # every combine has been joined: their inputs may be reused
        if shared and not interleaved:
            outputs = list(torch.cat(outputs).add_(shared[0]).split(list(schedule.chunks)))
        return outputs


def _tensors(handle) -> list:
    return [t for t in handle if isinstance(t, torch.Tensor)]
