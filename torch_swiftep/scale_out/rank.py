"""One rank's throughput dispatch and combine across nodes, with the Communicator's result types:
what Communicator delegates to when its CUDA world spans several nodes, and what the CPU tests
drive directly over a ThreadWorld."""
from __future__ import annotations

from typing import Optional

import torch

from ..results import DispatchResult
from ..status import BrokenCommunicatorError


class ScaleOutRank:
    def __init__(self, schedule):
        self.schedule = schedule
        self._broken: Optional[str] = None
        self._combine_window: Optional[torch.Tensor] = None

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
        """Errors are raised by the call that meets them (the schedule syncs the host)."""
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()
