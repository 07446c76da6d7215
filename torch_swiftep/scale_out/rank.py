"""One rank's throughput dispatch and combine across nodes, with the Communicator's result types:
what Communicator delegates to when its CUDA world spans several nodes, and what the CPU tests
drive directly over a ThreadWorld."""
from __future__ import annotations

from typing import Optional

import torch

from ..results import DispatchResult, LowLatencyDispatchResult
from ..status import BrokenCommunicatorError, SwiftepIndexError


class ScaleOutRank:
    """schedule: the throughput one (hierarchical.py); low_latency: the decode one
    (low_latency.py)."""

    def __init__(self, schedule, low_latency=None):
        self.schedule, self.low_latency = schedule, low_latency
        self._broken: Optional[str] = None
        self._combine_window: Optional[torch.Tensor] = None
        self._ll_window: Optional[torch.Tensor] = None

    def _guard(self, fn, *args):
        if self._broken is not None:
            raise BrokenCommunicatorError(f"this communicator is broken ({self._broken}); "
                                          "build a new one")
        try:
            return fn(*args)
        except BrokenCommunicatorError as exc:  # the ranks' calls no longer line up
            self._broken = str(exc)
            raise

    def dispatch(self, x, topk_idx, topk_weights, *, x_scales=None, quantize_fp8=False,
                 comm_id: int = -1, call: int = -1) -> DispatchResult:
        offsets, token_rows, recv_x, recv_scales, recv_src, recv_weights, route = self._guard(
            self.schedule.dispatch, x, x_scales, topk_idx, topk_weights, quantize_fp8)
        return DispatchResult(recv_x, recv_scales, recv_src, recv_weights, offsets, token_rows,
                              topk_idx, topk_weights, comm_id, call, route)

    def combine(self, expert_out, handle: DispatchResult, *, topk_weights=None) -> torch.Tensor:
        if handle.route is None:
            raise ValueError("combine across nodes needs the handle of a dispatch across nodes "
                             "(this one has no route)")
        weights = handle.topk_weights if topk_weights is None else topk_weights
        return self._guard(self.schedule.combine, expert_out, handle.route, weights)

    def low_latency_dispatch(self, x, topk_idx, topk_weights, *, x_scales=None,
                             quantize_fp8=False, comm_id: int = -1,
                             call: int = -1) -> LowLatencyDispatchResult:
        recv_x, recv_scales, recv_src, recv_weights, counts, token_rows, route = self._guard(
            self.low_latency.dispatch, x, x_scales, topk_idx, topk_weights, quantize_fp8)
        return LowLatencyDispatchResult(recv_x, recv_scales, recv_src, recv_weights, counts,
                                        token_rows, topk_idx, topk_weights, comm_id, call, route)

    def low_latency_combine(self, expert_out, handle, *, topk_weights=None) -> torch.Tensor:
        weights = handle.topk_weights if topk_weights is None else topk_weights
        return self._guard(self.low_latency.combine, expert_out, handle.route, weights)

    def low_latency_combine_buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """A [L, S, hidden] tensor the experts may write into (combine reads any tensor)."""
        g = self.schedule.g
        if self._ll_window is None:
            self._ll_window = torch.empty(g.L * g.S_ll * g.H * g.dtype.itemsize,
                                          dtype=torch.uint8, device="cuda")
        n = g.L * g.S_ll * g.H
        return self._ll_window[:n * dtype.itemsize].view(dtype).view(g.L, g.S_ll, g.H)

    def combine_buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """A [capacity, hidden] tensor the experts may write into; across nodes it is an
        ordinary tensor (combine reads any tensor in place), kept so code written for the
        one-node window runs unchanged."""
        g = self.schedule.g
        if self._combine_window is None:
            self._combine_window = torch.empty(g.cap * g.H * g.dtype.itemsize,
                                               dtype=torch.uint8, device="cuda")
        return self._combine_window[:g.cap * g.H * dtype.itemsize].view(dtype).view(g.cap, g.H)

    def check(self) -> None:
        """The throughput schedule raises in the call that meets an error (it syncs the host);
        the low-latency one records them (it may be captured in a CUDA graph): raise those.
        Reading them waits for this stream's work."""
        if self.low_latency is None:
            return
        self._guard(self.low_latency.t.check)
        bad = int(self.low_latency.bad_index.item())
        if bad:
            self.low_latency.bad_index.zero_()
            raise SwiftepIndexError(f"{bad} topk_idx entries of low-latency calls were out of "
                                    "range (entries must be -1 or in [0, num_experts)); those "
                                    "slots were sent nowhere")
