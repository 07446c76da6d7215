"""torch's symmetric memory: the communicator's workspace, and the experts' output that
combine(symmetric=True) reads where the experts wrote it, on every owner.

The experts allocate their output inside ``Communicator.expert_output_pool()``: torch's
symmetric memory pool (``torch.distributed._symmetric_memory.get_mem_pool``), a MemPool that
gives every tensor a segment of its own. A segment's first symmetric combine rendezvouses it
over the group (``symm_mem.rendezvous``, a collective that maps it on every peer) and keeps the
device table of every rank's row-0 address (the handle's ``buffer_ptrs``); later combines of a
tensor in the same segment (the pool hands a freed segment to the next allocation of its size)
find the table by (address, bytes) without any communication.

The rendezvous is collective, so before it the ranks agree, bounded by timeout_s, that every
one of them is there with a tensor from the pool (``Agreement.arrive``): a rank whose tensor is
not from the pool, or that called the plain combine, is named instead of hanging the others.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .status import BrokenCommunicatorError

TABLE_UNDER_COMPILE = (
    "combine(symmetric=True) finds the table of every rank's expert_out address on the host "
    "(a dictionary lookup; on a segment's first use, a rendezvous over the group)")
NOT_FROM_POOL = "expert_out must be allocated inside Communicator.expert_output_pool()"


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
    """torch.cuda.use_mem_pool(symm_mem.get_mem_pool(device)) on CUDA; nothing on CPU. Every
    rank must allocate the same sizes in the same order inside it (torch's requirement for this
    pool), and keep the tensor it passes to combine alive until its next dispatch on that
    communicator has been issued: a freed segment goes to the next allocation of its size, which
    could overwrite rows a peer is still reading, and that dispatch's count barrier is what
    tells this rank that every peer finished reading."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    import torch.distributed._symmetric_memory as symm_mem

    return torch.cuda.use_mem_pool(symm_mem.get_mem_pool(device))


def _unusable(expert_out, device: torch.device, world: int) -> Optional[Exception]:
    """Why expert_out cannot be rendezvoused, found on this rank alone (before the collective,
    so that its peers hear of it instead of waiting), or None."""
    if not isinstance(expert_out, torch.Tensor):
        return TypeError(f"expert_out must be a torch.Tensor, got {type(expert_out).__name__}")
    if expert_out.device != device:
        return ValueError(f"expert_out is on {expert_out.device}, but the communicator is on "
                          f"{device}")
    if world == 1:  # the table is this tensor's own address: any tensor will do
        return None
    import torch.distributed._symmetric_memory as symm_mem

    is_symmetric = getattr(symm_mem, "is_symm_mem_tensor", None)  # newer torch only
    if expert_out.storage_offset() != 0 or (is_symmetric is not None and
                                            not is_symmetric(expert_out)):
        return ValueError(f"{NOT_FROM_POOL} (the whole tensor, not a view into one): "
                          f"data_ptr {expert_out.data_ptr():#x} (storage offset "
                          f"{expert_out.storage_offset()}) does not start a segment of the pool")
    return None


class RowBaseTables:
    """One communicator's row_bases tables: (data_ptr, storage bytes) -> (table, handle). The
    handle of torch's rendezvous is kept with its table, so the peers' mappings stay."""

    def __init__(self):
        self._tables: dict = {}
        # The combine call whose ranks first agreed on the symmetric path (None: not yet). From
        # then on a plain combine is refused: its peers would read this rank's segment, which
        # holds the previous call's rows, and return them without any error.
        self.engaged_at: Optional[int] = None

    def refuse_plain(self, comm) -> None:
        """Before a plain combine: once the symmetric path is engaged, refuse it, telling the
        peers at once (the same path as a rejected input: they raise naming this rank)."""
        if self.engaged_at is None:
            return
        error = ValueError(
            f"rank {comm.rank}: this Communicator's combines read the experts' output in place "
            f"since combine call {self.engaged_at} (symmetric=True on every rank): pass "
            "symmetric=True, or use another Communicator for plain combines")
        call = comm._ledger.next_call("combine", ok=False)
        if comm._agreement is not None and comm.device.type == "cpu":
            comm._agreement.before_call("combine", call, error)
        elif comm._agreement is not None:
            comm._announce_failure("combine", call, error)
        raise error

    def table(self, comm, expert_out) -> torch.Tensor:
        """row_bases for comm.combine(expert_out, handle, symmetric=True): int64 [world_size]
        on comm.device. CPU: zeros (the CPU backend ignores it)."""
        if comm.device.type != "cuda":
            self._engage(comm)
            return torch.zeros(comm.world_size, dtype=torch.int64, device=comm.device)
        table = self._cuda_table(comm, expert_out)
        self._engage(comm)
        return table

    def _engage(self, comm) -> None:
        if self.engaged_at is None:
            self.engaged_at = comm._ledger.calls + 1  # the number this combine will get

    @torch.compiler.disable(reason=TABLE_UNDER_COMPILE)
    def _cuda_table(self, comm, expert_out) -> torch.Tensor:
        error = _unusable(expert_out, comm.device, comm.world_size)
        key = None
        if error is None:
            key = (expert_out.data_ptr(), expert_out.untyped_storage().nbytes())
            if key in self._tables:
                return self._tables[key][0]
        if comm.world_size == 1:
            if error is not None:  # the op's own checks name it
                return torch.zeros(1, dtype=torch.int64, device=comm.device)
            handle, ptrs = None, [expert_out.data_ptr()]
        else:
            handle = self._rendezvous(comm, expert_out, error)
            ptrs = list(handle.buffer_ptrs)
        table = torch.tensor(ptrs, dtype=torch.int64, device=comm.device)
        self._tables[key] = (table, handle)
        return table

    @staticmethod
    def _rendezvous(comm, expert_out, error: Optional[Exception]):
        """Agree that every rank is here with a tensor from the pool, then rendezvous it."""
        if comm._agreement is None:
            raise ValueError("combine(symmetric=True) needs the Communicator's process group "
                             "(torch's rendezvous is collective); a world emulated in one "
                             "process has none")
        comm._check_status()  # a broken communicator does not start a collective
        call = comm._ledger.calls + 1  # the number this combine gets, the same on every rank
        what = f"combine_symmetric call {call} (the rendezvous of expert_out's segment)"
        try:
            comm._agreement.arrive(what, error)
        except BrokenCommunicatorError as exc:  # a rank never came: it took another path
            comm._announce_failure("combine_symmetric", call, exc)
            raise
        if error is not None:
            raise error
        import torch.distributed._symmetric_memory as symm_mem

        try:
            handle = symm_mem.rendezvous(expert_out, comm.group_name)
        except RuntimeError as exc:  # a torch without is_symm_mem_tensor: found only here
            if getattr(symm_mem, "is_symm_mem_tensor", None) is not None:
                raise
            raise ValueError(f"{NOT_FROM_POOL}: torch's rendezvous refused it "
                             f"({str(exc).splitlines()[0] if str(exc) else exc!r})") from exc
        mine = handle.buffer_ptrs[comm.rank]
        if expert_out.data_ptr() != mine:  # a backstop: _unusable checks this before
            error = ValueError(f"{NOT_FROM_POOL}: its data_ptr {expert_out.data_ptr():#x} is "
                               f"not the start of its segment ({mine:#x})")
            comm._announce_failure("combine_symmetric", call, error)
            raise error
        return handle
