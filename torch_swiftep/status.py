"""Errors that kernels report without a host sync.

A CUDA kernel that finds a problem (capacity overflow, an index out of range, a rank that never
arrived within timeout_s) stops touching memory it must not touch, writes a status record into
the workspace's ctrl region and into a host-mapped mirror, and exits. The communicator reads
the mirror (plain host memory, no sync) at the start of every eager call and in check(), and
raises SwiftepError naming the problem. The CPU backend raises the same classes at once.
"""
from __future__ import annotations

import torch

from .ops.protocol import STATUS, WAIT_NAMES


class SwiftepError(RuntimeError):
    """A communication kernel reported an error (see the message)."""


class SwiftepIndexError(SwiftepError, IndexError):
    """A topk_idx entry is neither -1 nor an expert: IndexError on every backend."""


class BrokenCommunicatorError(SwiftepError):
    """A rank failed or vanished mid-protocol: this communicator must be rebuilt."""


REBUILD = ("this communicator must be rebuilt (over the ranks that remain: "
           "dist.new_group(ranks, use_local_synchronization=True))")
# Kernel reports after which the ranks' call counters disagree: the communicator is broken.
BREAKING_CODES = (STATUS["timeout"], STATUS["peer_failed"], STATUS["bad_segment"])


def rank_name(rank: int, ranks_per_node: int | None = None, world: int | None = None) -> str:
    """"rank 3", or "rank 3 (node 1)" when the world is grouped into several nodes, so an error
    about a rank across a node boundary says which node to look at."""
    if ranks_per_node and world and ranks_per_node < world:
        return f"rank {rank} (node {rank // ranks_per_node})"
    return f"rank {rank}"


def describe(status: list[int], rank: int, ranks_per_node: int | None = None,
             world: int | None = None) -> tuple[type, str] | None:
    """(exception class, message) of a status record, or None when it reports no error.
    ranks_per_node and world (when the world has several nodes) add the node of the rank the
    record names."""
    code, a0, a1, a2 = (int(v) for v in status[:4])
    peer = rank_name(a0, ranks_per_node, world)
    if code == STATUS["ok"]:
        return None
    if code == STATUS["capacity"]:
        return SwiftepError, (
            f"rank {rank}: capacity overflow: {peer} would receive {a1} rows, more than "
            f"capacity={a2}; no row past the window was written. Build the Communicator with "
            "a larger capacity")
    if code == STATUS["timeout"]:
        what = WAIT_NAMES[a1] if 0 <= a1 < len(WAIT_NAMES) else f"wait #{a1}"
        return SwiftepError, (
            f"rank {rank}: timed out waiting for {peer} ({what}, call {a2}): that rank "
            "never arrived within timeout_s; results of this call are invalid")
    if code == STATUS["peer_failed"]:
        what = WAIT_NAMES[a1] if 0 <= a1 < len(WAIT_NAMES) else f"wait #{a1}"
        return BrokenCommunicatorError, (
            f"rank {rank}: {peer} failed a call, so this rank's {what} wait (call {a2}) gave "
            "up at once; results of this call are invalid")
    if code == STATUS["bad_index"]:
        return SwiftepIndexError, (
            f"rank {rank}: topk_idx[{a0}, {a1}] = {a2} is out of range: entries must be -1 or "
            "in [0, num_experts); the token was not sent")
    if code == STATUS["bad_segment"]:
        return SwiftepError, (
            f"rank {rank}: {peer} published expert_out segment {a1}, which is not among the "
            f"{a2} rows of this rank's segment table: the ranks' symmetric combines diverged; "
            "results of this call are invalid")
    return SwiftepError, f"rank {rank}: unknown status code {code} ({a0}, {a1}, {a2})"


def raise_if_error(host_status: torch.Tensor, rank: int, clear: bool = True,
                   about_rank=None, ranks_per_node: int | None = None,
                   world: int | None = None) -> None:
    """Raise the error the status record reports, if any. about_rank(peer) may add what is
    known of the rank a timeout waited for (e.g. that it rejected its inputs)."""
    status = host_status.tolist()
    found = describe(status, rank, ranks_per_node, world)
    if found is None:
        return
    if clear:
        host_status.zero_()
    exc, message = found
    if status[0] in BREAKING_CODES:
        known = about_rank(int(status[1])) if about_rank is not None else None
        if known:
            message += f"; {known}"
        message += f"; {REBUILD}"
        exc = BrokenCommunicatorError
    raise exc(message)
