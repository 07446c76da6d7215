"""What the communication calls return: the dispatch handles (pass them whole to combine) and
the pending call of Communicator.start."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class DispatchResult(NamedTuple):
    """What dispatch returns; pass it whole to combine. L = local experts, C = capacity.

    recv_x: [C, hidden], x's dtype: expert-major rows; expert j owns rows
        [expert_offsets[j], expert_offsets[j+1]); rows past expert_offsets[-1] are undefined.
        A view of this rank's window: valid until the next dispatch.
    recv_scales: [C, hidden / 128] float32 for FP8 dispatch, else None.
    recv_src: [C, 2] int32: (source rank, source token) of each row.
    recv_weights: [C] float32: the token's weight for this row's expert.
    expert_offsets: [L + 1] int32 on the device; expert_offsets[1:] is grouped_mm's `offs`.
    token_rows: [num_tokens, K] int32: row of each (token, slot) on its owner, -1 for none.
    topk_idx, topk_weights: the routing, kept for combine.
    comm_id, call: the Communicator and the dispatch this handle comes from (combine refuses a
        foreign or stale handle; call is -1 for a dispatch traced by torch.compile).
    route: across nodes (scale_out.Route), what this rank's combine needs of the dispatch;
        None in one node.
    """

    recv_x: torch.Tensor
    recv_scales: Optional[torch.Tensor]
    recv_src: torch.Tensor
    recv_weights: torch.Tensor
    expert_offsets: torch.Tensor
    token_rows: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    comm_id: int = -1
    call: int = -1
    route: Optional[tuple] = None


class LowLatencyDispatchResult(NamedTuple):
    """Static shapes for CUDA graphs. L = local experts, S = world_size * ll_max_tokens_per_rank.

    recv_x: [L, S, hidden]: expert j's rows packed in [0, recv_counts[j]).
    recv_scales: [L, S, hidden / 128] float32 for FP8, else None.
    recv_src: [L, S, 2] int32; recv_weights: [L, S] float32.
    recv_counts: [L] int32 on the device.
    token_rows: [num_tokens, K] int32: flat row j * S + slot on the owner, -1 for none.
    comm_id, call: where the handle comes from, as in DispatchResult.
    """

    recv_x: torch.Tensor
    recv_scales: Optional[torch.Tensor]
    recv_src: torch.Tensor
    recv_weights: torch.Tensor
    recv_counts: torch.Tensor
    token_rows: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    comm_id: int = -1
    call: int = -1
    route: Optional[tuple] = None  # across nodes: scale_out.LowLatencyRoute


class PendingCall:
    """A communication call issued on the communicator's side stream (Communicator.start).

    wait() makes the caller's current stream wait for it and returns its result; until then
    the caller's stream is free to run other work (the experts of the previous chunk, attention
    of the next micro-batch) on the SMs the communication kernels leave free.
    """

    def __init__(self, result, event):
        self._result, self._event = result, event

    def wait(self):
        if self._event is not None:
            current = torch.cuda.current_stream()
            current.wait_event(self._event)
            # the result was allocated on the side stream; it is now used on this one
            for t in tensors_in(self._result):
                t.record_stream(current)
        return self._result


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    return []
