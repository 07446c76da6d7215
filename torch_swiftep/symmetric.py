"""torch's symmetric memory: the communicator's workspace, and the experts' output that
combine(symmetric=True) reads where the experts wrote it, on every owner.

The experts allocate their output inside ``Communicator.expert_output_pool()``: torch's
symmetric memory pool (``torch.distributed._symmetric_memory.get_mem_pool``). torch's
rendezvous, which maps a segment on every peer, is collective and takes segments of one size
on every rank, while the experts' outputs differ in size from rank to rank and step to step.
So a communicator's first entry into the pool reserves segments of one size on every rank,
rendezvouses them and frees them into the pool, where the experts' tensors then land
(SegmentTables); a combine never rendezvouses. Which free segment a rank's pool hands out is
rank-local (its own addresses break ties), so each rank publishes on the device where its
tensor is (segment, offset), and its peers look that up in the table of every rank's address
of every reserved segment. A tensor in no reserved segment is staged into the combine window
instead: one copy, the same result, a warning the first time.

The rendezvous is collective, so before it the ranks agree, bounded by timeout_s, that every
one of them is there (``Agreement.arrive``); the first symmetric combine agrees the same way,
so a rank that called the plain combine instead is named rather than hanging the others.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch

from .status import BrokenCommunicatorError

TABLE_UNDER_COMPILE = (
    "combine(symmetric=True) finds expert_out's segment on the host (a search of the few "
    "reserved segments)")
NOT_FROM_POOL = "expert_out must be allocated inside Communicator.expert_output_pool()"
# What a communicator's first entry into the pool reserves: RESERVED_SEGMENTS large segments,
# each the combine window's size (capacity rows of hidden in the config's dtype: combine's
# contract makes expert_out cover the window, so a layer's output always fits one), and one
# small-pool segment, for tensors of up to 1 MiB, which torch's caching allocator serves from
# 2 MiB segments of their own.
RESERVED_SEGMENTS = 2
SMALL_BLOCK_BYTES = 1 << 20
LARGE_MIN_BYTES = 2 << 20  # above the small pool's requests
STAGED_SEGMENT = -1  # ops/combine_symmetric.py: rows staged into the combine window
# (group name, device) -> (table, segments): what this process reserved for that group. The
# communicators of a group share it (their tensors come from one pool); kept for the process's
# life, since the peers' mappings of the segments must stay.
_RESERVED: dict = {}


def symmetric_workspace(plan, group, device: torch.device):
    """(workspace, peer_ptrs, handle): the rank's workspace from torch's symmetric memory,
    zeroed and rendezvoused over the group, and the device table of every rank's base."""
    import torch.distributed._symmetric_memory as symm_mem

    workspace = symm_mem.empty(plan.workspace_bytes, dtype=torch.uint8, device=device)
    workspace.zero_()
    handle = symm_mem.rendezvous(workspace, group.group_name)
    peer_ptrs = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
    torch.cuda.synchronize(device)
    return workspace, peer_ptrs, handle


def expert_output_pool(device: torch.device):
    """torch.cuda.use_mem_pool(symm_mem.get_mem_pool(device)) on CUDA; nothing on CPU. A rank
    keeps the tensor it passes to combine alive until its next dispatch on that communicator has
    been issued: the pool hands a freed block to the next allocation, which could overwrite rows
    a peer is still reading, and that dispatch's count barrier is what tells this rank that
    every peer finished reading."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    import torch.distributed._symmetric_memory as symm_mem

    return torch.cuda.use_mem_pool(symm_mem.get_mem_pool(device))


def _unusable(expert_out, device: torch.device, world: int) -> Optional[Exception]:
    """Why expert_out cannot be read in place or staged, found on this rank alone, or None."""
    if not isinstance(expert_out, torch.Tensor):
        return TypeError(f"expert_out must be a torch.Tensor, got {type(expert_out).__name__}")
    if expert_out.device != device:
        return ValueError(f"expert_out is on {expert_out.device}, but the communicator is on "
                          f"{device}")
    if world == 1:  # the table is this tensor's own address: any tensor will do
        return None
    import torch.distributed._symmetric_memory as symm_mem

    is_symmetric = getattr(symm_mem, "is_symm_mem_tensor", None)  # newer torch only
    if is_symmetric is not None and not is_symmetric(expert_out):
        return ValueError(f"{NOT_FROM_POOL}: data_ptr {expert_out.data_ptr():#x} is in no "
                          "symmetric memory allocation")
    return None


class SegmentTables:
    """One communicator's reserved segments of the expert_out pool and the device table of
    every rank's address of each: bases[i][r] is rank r's segment i as mapped here (module
    docstring). A combine passes the table and where its own expert_out is in it
    (segment, byte offset), or STAGED_SEGMENT."""

    def __init__(self, world: int, key: tuple):
        self._world = world
        self._key = key  # (group, device): the communicators of one group share the segments
        self._unreserved: Optional[torch.Tensor] = None  # a table with no segment, if needed
        self.staged_calls = 0  # symmetric combines whose expert_out was in no segment
        # The combine call whose ranks first agreed on the symmetric path (None: not yet). From
        # then on every throughput combine publishes where its rows are (plain_table): a plain
        # combine's kernel would read the windows of peers that staged nothing.
        self.engaged_at: Optional[int] = None
        self._engaged_bases: Optional[torch.Tensor] = None  # the table from then on

    @property
    def _bases(self) -> Optional[torch.Tensor]:  # int64 [segments, world], on the device
        reserved = _RESERVED.get(self._key)
        return reserved[0] if reserved is not None else self._unreserved

    @property
    def _segments(self) -> list:  # (base, bytes, handle) of this rank, by segment number
        reserved = _RESERVED.get(self._key)
        return reserved[1] if reserved is not None else []

    def pool(self, comm):
        """comm.expert_output_pool(): reserves the segments on its first entry (collective)."""
        if comm.device.type == "cuda":
            self.reserve(comm)
        return expert_output_pool(comm.device)

    def reserve(self, comm) -> None:
        """The group's segments, once per process (every rank's first pool entry on it)."""
        if self._key not in _RESERVED:
            _RESERVED[self._key] = self._reserve(comm)

    def plain_table(self, comm) -> Optional[tuple]:
        """Once the symmetric path is engaged, a plain combine is combine_symmetric with its
        rows staged (segment -1): its peers read every owner where it says its rows are, so
        ranks may mix plain and symmetric combines from then on. Before: None (combine's own
        kernel, which reads every owner's window)."""
        if self.engaged_at is None:
            return None
        return self._engaged_bases, STAGED_SEGMENT, 0

    def table(self, comm, expert_out, routing: tuple) -> tuple:
        """(segment_bases, segment, segment_offset) for comm.combine(expert_out, handle,
        symmetric=True); routing: the op's arguments after the table. CPU: a zero table (the
        CPU backend ignores it). A first call whose inputs the op refuses does not engage the
        path (its error is raised by the op's checks, as for any call)."""
        if comm.device.type != "cuda":
            found = (torch.zeros(1, comm.world_size, dtype=torch.int64), 0, 0)
        else:
            found = self._cuda_table(comm, expert_out)
        if self.engaged_at is None and _accepted(expert_out, found[0], routing):
            self.engaged_at = comm._ledger.calls + 1  # the number this combine will get
            self._engaged_bases = found[0]
        return found

    def _locate(self, ptr: int, nbytes: int) -> Optional[tuple]:
        """(segment, offset) of a reserved segment holding [ptr, ptr + nbytes), or None."""
        for number, (base, size, _) in enumerate(self._segments):
            if base <= ptr and ptr + nbytes <= base + size:
                return number, ptr - base
        return None

    @torch.compiler.disable(reason=TABLE_UNDER_COMPILE)
    def _cuda_table(self, comm, expert_out) -> tuple:
        error = _unusable(expert_out, comm.device, comm.world_size)
        if self.engaged_at is None and comm.world_size > 1:
            call = comm._ledger.calls + 1  # the number this combine gets, the same everywhere
            _agree(comm, error, f"combine_symmetric call {call} (the first symmetric combine)")
        elif error is not None:
            if comm._agreement is not None:  # the peers' kernels give up at once, naming it
                comm._announce_failure("combine_symmetric", comm._ledger.calls + 1, error)
            raise error
        if self._bases is None:  # the pool was never entered: nothing reserved
            self._unreserved = torch.zeros(1, self._world, dtype=torch.int64,
                                           device=comm.device)
        found = self._locate(expert_out.data_ptr(), _nbytes(expert_out))
        return (self._bases, *found) if found is not None else self._staged(comm, expert_out)

    def _staged(self, comm, expert_out) -> tuple:
        self.staged_calls += 1
        if self.staged_calls == 1:
            warnings.warn(
                f"rank {comm.rank}: expert_out ({_nbytes(expert_out)} bytes at "
                f"{expert_out.data_ptr():#x}) is in none of the {len(self._segments)} segments "
                "this Communicator reserved in expert_output_pool(): its rows are staged (one "
                "copy). Allocate expert_out inside comm.expert_output_pool(), at most "
                f"{RESERVED_SEGMENTS} alive at once, each at most capacity="
                f"{comm.plan.capacity} rows of the config's dtype", stacklevel=5)
        return self._bases, STAGED_SEGMENT, 0

    def _reserve(self, comm) -> tuple:
        """(table, segments): the segments, the same sizes on every rank, rendezvoused in the
        same order, then freed into the pool; the device table of every rank's address."""
        if comm.world_size > 1:
            _agree(comm, None, "expert_output_pool (its first entry reserves segments)")
        large = max(LARGE_MIN_BYTES, comm.plan.capacity * comm.config.hidden
                    * torch.empty(0, dtype=comm.config.dtype).element_size())
        with expert_output_pool(comm.device):
            blocks = [torch.empty(SMALL_BLOCK_BYTES, dtype=torch.uint8, device=comm.device)]
            blocks += [torch.empty(large, dtype=torch.uint8, device=comm.device)
                       for _ in range(RESERVED_SEGMENTS)]
        rows, segments = [], []
        for block in blocks:
            ptrs, extent, handle = self._rendezvous(comm, block)
            offset = block.data_ptr() - ptrs[comm.rank]
            segments.append((ptrs[comm.rank], max(extent, offset + block.numel()), handle))
            rows.append(ptrs)
        return torch.tensor(rows, dtype=torch.int64).to(comm.device), segments

    @staticmethod
    def _rendezvous(comm, block) -> tuple:
        """(every rank's address of block's allocation, its bytes, torch's handle)."""
        if comm.world_size == 1:
            return [block.data_ptr()], 0, None
        import torch.distributed._symmetric_memory as symm_mem

        handle = symm_mem.rendezvous(block, comm.group_name)
        if handle is None:  # torch 2.11 warns and returns None for memory outside the pool
            raise RuntimeError("torch's symmetric memory rendezvous refused a block allocated "
                               "inside its own pool (get_mem_pool)")
        # buffer_ptrs are the allocations' starts: later tensors anywhere in one are found
        return list(handle.buffer_ptrs), int(getattr(handle, "buffer_size", 0) or 0), handle


def _accepted(expert_out, table: torch.Tensor, routing: tuple) -> bool:
    """Whether combine_symmetric's contract checks accept these arguments."""
    from .ops import BY_NAME

    try:
        BY_NAME["combine_symmetric"].check(expert_out, table, 0, 0, *routing)
    except (ValueError, TypeError, IndexError):
        return False
    return True


def _nbytes(tensor: torch.Tensor) -> int:
    """The bytes a contiguous tensor spans from its data_ptr (the op refuses other layouts)."""
    return tensor.numel() * tensor.element_size()


def _agree(comm, error: Optional[Exception], what: str) -> None:
    """Agree, bounded by timeout_s, that every rank is here (before a collective of torch's,
    or the first symmetric combine): a rank with an error is named to the others."""
    if comm._agreement is None:
        raise ValueError("combine(symmetric=True) needs the Communicator's process group "
                         "(torch's rendezvous is collective); a world emulated in one process "
                         "has none")
    comm._check_status()  # a broken communicator does not start a collective
    try:
        comm._agreement.arrive(what, error)
    except BrokenCommunicatorError as exc:  # a rank never came: it took another path
        comm._announce_failure("combine_symmetric", comm._ledger.calls + 1, exc)
        raise
    if error is not None:
        raise error
