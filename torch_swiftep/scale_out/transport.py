"""What the hierarchical schedule needs from a transport, and the two that provide it.

A transport gives each rank named symmetric buffers (same names and sizes on every rank), a put
of rows into a peer's buffer that ends by setting one signal on each target rank, and a bounded
wait for signals. That is exactly NVSHMEM's put-with-signal (csrc/nvshmem/transport.h), so:

- NvshmemTransport: the real one. Buffers from the NVSHMEM symmetric heap, puts and waits are
  the transport kernels, enqueued on the current CUDA stream (no host sync); over NVLink/P2P
  inside a node and over IBGDA RDMA across nodes.
- ThreadWorld: every rank a thread of one process, buffers plain tensors, a put a row copy. For
  CPU tests of the schedule's bookkeeping (counts, offsets, forwarding order, timeouts), which
  is the same code whichever transport runs it.

Errors follow the kernels' convention: a wait that gives up records {TIMEOUT, source rank,
signal, epoch} in the call's status and later waits of the call return at once; check() raises.
"""
from __future__ import annotations

import threading
import time
from typing import NamedTuple, Optional, Sequence

import torch

from ..nvshmem_engine import NvshmemError
from ..status import BrokenCommunicatorError, rank_name

# NVSHMEM blocks (queues) per destination rank of a put: one slow queue does not serialize a
# node's traffic (the transport's `channels`).
CHANNELS = 2


class Region(NamedTuple):
    """A typed [rows, width] view of the start of a named symmetric buffer."""

    name: str
    rows: int
    width: int
    dtype: torch.dtype

    def on(self, flat: torch.Tensor) -> torch.Tensor:
        nbytes = self.rows * self.width * self.dtype.itemsize
        return flat[:nbytes].view(self.dtype).view(self.rows, self.width)


class CallStatus:
    """The first error of one call: which signal, which rank was waited for."""

    def __init__(self):
        self.record: Optional[tuple[str, int, int]] = None  # (signal, source rank, epoch)

    def fail(self, signal: str, source: int, epoch: int) -> None:
        if self.record is None:
            self.record = (signal, source, epoch)


def timeout_error(rank: int, per_node: int, world: int, record, timeout_s: float,
                  about_rank=None) -> BrokenCommunicatorError:
    signal, source, epoch = record
    message = (f"{rank_name(rank, per_node, world)}: timed out after {timeout_s:g} s waiting for "
               f"{rank_name(source, per_node, world)} (scale-out signal '{signal}', call "
               f"{epoch}): that rank never arrived; results of this call are invalid")
    known = about_rank(source) if about_rank is not None else None
    if known:
        message += f"; {known}"
    return BrokenCommunicatorError(message + "; this communicator must be rebuilt")


def target_lookup(targets: Sequence[int], device) -> torch.Tensor:
    """lookup[pe] = the index of pe in targets, len(targets) for any other pe (the last entry
    stands for every pe outside [0, max(targets)], e.g. -1: no destination)."""
    lookup = torch.full((max(targets) + 2,), len(targets), dtype=torch.long)
    lookup[list(targets)] = torch.arange(len(targets))
    return lookup.to(device)


def group_by_target(dest: torch.Tensor, lookup: torch.Tensor, num_targets: int) -> tuple:
    """(order of the items grouped by target, offsets [num_targets + 1] int32): items whose dest
    is targets[i] come at [offsets[i], offsets[i + 1]); items whose dest is no target (-1) come
    after offsets[-1], so no put sends them. No host sync (CUDA-graph capturable)."""
    last = lookup.numel() - 1
    slot = lookup[torch.where((dest >= 0) & (dest < last), dest, last)]
    order = torch.argsort(slot, stable=True)
    counts = torch.zeros(num_targets + 1, dtype=torch.long, device=dest.device)
    counts.scatter_add_(0, slot, torch.ones_like(slot))
    offsets = torch.zeros(num_targets + 1, dtype=torch.int32, device=dest.device)
    offsets[1:] = counts[:-1].cumsum(0)
    return order, offsets


# ------------------------------------------------------------------------------ NVSHMEM
class NvshmemTransport:
    """Over NVSHMEM (torch_swiftep.nvshmem_engine): collective construction."""

    def __init__(self, engine, group, buffer_bytes: dict[str, int], signal_names: Sequence[str],
                 ranks_per_node: int, timeout_s: float, device: str = "cuda"):
        import torch.distributed as dist

        self.engine, self.rank, self.world = engine, engine.rank, engine.world
        self.device = torch.device(device)
        self.per_node, self.timeout_s = ranks_per_node, timeout_s
        self.signal_names = list(signal_names)
        signal_bytes = len(self.signal_names) * self.world * CHANNELS * 8
        try:
            self.flat = {name: engine.alloc(max(n, 16))
                         for name, n in sorted(buffer_bytes.items())}
            self._signals = engine.alloc(signal_bytes)
        except NvshmemError as exc:  # the same sizes on every rank: every rank says this
            need = sum(max(n, 16) for n in buffer_bytes.values()) + signal_bytes
            raise NvshmemError(
                f"{exc}; the scale-out buffers need {need / 2**20:.1f} MiB of the NVSHMEM "
                "symmetric heap per rank (its windows, staging and signals): set "
                "NVSHMEM_SYMMETRIC_SIZE above that before NVSHMEM starts, or build the "
                "Communicator with a smaller capacity / max_tokens_per_rank") from exc
        self._signals.zero_()
        self._status = torch.zeros(len(self.signal_names), 4, dtype=torch.int64,
                                   device=self.device)
        self._targets: dict[tuple, tuple] = {}  # targets -> (lookup, PEs): made once, on device
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier(group)  # every rank's signals are zero before anyone puts

    def buffer(self, region: Region) -> torch.Tensor:
        return region.on(self.flat[region.name])

    def _signal_array(self, name: str) -> torch.Tensor:
        i = self.signal_names.index(name)
        per = self.world * CHANNELS
        return self._signals.view(torch.int64)[i * per:(i + 1) * per]

    def source(self, tensor: torch.Tensor) -> None:
        """Makes a local tensor (x) a put source over remote transports (once per CUDA
        allocation and process: NvshmemEngine.register_allocation_of)."""
        self.engine.register_allocation_of(tensor)

    def put(self, region: Region, src: torch.Tensor, src_rows: torch.Tensor,
            dst_rows: torch.Tensor, dest: torch.Tensor, targets: Sequence[int], signal: str,
            epoch: int) -> None:
        if not targets:
            return
        lookup, dest_pes = self._pes(targets)
        order, offsets = group_by_target(dest, lookup, len(targets))
        dst = self.buffer(region).view(torch.uint8)
        src_bytes = src.contiguous().view(torch.uint8)  # [rows, row bytes]
        empty = src_rows.numel() == 0
        as_i32 = lambda t: (torch.zeros(1, dtype=torch.int32, device=dst.device) if empty  # noqa
                            else t[order].to(torch.int32))
        self.engine.put_rows(src_bytes if src_bytes.size(0) else dst[:1], dst, as_i32(src_rows),
                             as_i32(dst_rows), offsets, dest_pes, channels=CHANNELS,
                             signals=self._signal_array(signal), **_epoch_args(epoch),
                             status=self._status[self.signal_names.index(signal)])

    def _pes(self, ranks: Sequence[int]) -> tuple:
        key = tuple(ranks)
        if key not in self._targets:  # host-to-device copies: never while a graph captures
            self._targets[key] = (target_lookup(key, self.device),
                                  torch.tensor(key, dtype=torch.int32, device=self.device))
        return self._targets[key]

    def wait(self, signal: str, sources: Sequence[int], epoch) -> None:
        if not sources:
            return
        self.engine.wait_signals(
            self._signal_array(signal), self._pes(sources)[1], channels=CHANNELS,
            **_epoch_args(epoch), ranks_per_node=self.per_node,
            timeout_ms=max(1, int(self.timeout_s * 1000)),
            status=self._status[self.signal_names.index(signal)])

    def check(self, about_rank=None) -> None:
        """Host sync; raises the first recorded error of the call (and clears it)."""
        status = self._status.cpu()
        bad = (status[:, 0] != 0).nonzero()
        if bad.numel() == 0:
            return
        i = int(bad[0, 0])
        code, a0, a1, a2 = (int(v) for v in status[i])
        self._status.zero_()
        from ..ops.protocol import STATUS
        if code == STATUS["timeout"]:
            raise timeout_error(self.rank, self.per_node, self.world,
                                (self.signal_names[i], a0, a2), self.timeout_s, about_rank)
        raise BrokenCommunicatorError(
            f"{rank_name(self.rank, self.per_node, self.world)}: the scale-out put of "
            f"'{self.signal_names[i]}' reported status {code} ({a0}, {a1}, {a2}): an index out "
            "of range (csrc/nvshmem/transport.h); results of this call are invalid")

    def close(self) -> None:
        for flat in self.flat.values():
            self.engine.free(flat)
        self.engine.free(self._signals)
        self.flat = {}


def _epoch_args(epoch) -> dict:
    """A call's epoch: a Python int, or a uint64 [1] device tensor the kernels read (advanced
    on the device, so a captured CUDA graph replays with fresh epochs)."""
    if isinstance(epoch, torch.Tensor):
        return {"epoch": 0, "epoch_ptr": epoch}
    return {"epoch": epoch}


# --------------------------------------------------------------------- threads (CPU tests)
class ThreadWorld:
    """W ranks as threads of one process: world.transport(rank) for each."""

    def __init__(self, world: int, ranks_per_node: int, timeout_s: float):
        self.world, self.per_node, self.timeout_s = world, ranks_per_node, timeout_s
        self.flat: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
        self.signals: dict[tuple[int, str, int], int] = {}  # (dest, signal, source) -> epoch
        self.cond = threading.Condition()

    def transport(self, rank: int, buffer_bytes: dict[str, int],
                  signal_names: Sequence[str]) -> "ThreadTransport":
        self.flat[rank] = {name: torch.zeros(max(n, 16), dtype=torch.uint8)
                           for name, n in buffer_bytes.items()}
        return ThreadTransport(self, rank, list(signal_names))


class ThreadTransport:
    def __init__(self, world: ThreadWorld, rank: int, signal_names: list[str]):
        self.w, self.rank, self.world = world, rank, world.world
        self.per_node, self.timeout_s = world.per_node, world.timeout_s
        self.signal_names = signal_names
        self.status = CallStatus()

    def buffer(self, region: Region) -> torch.Tensor:
        return region.on(self.w.flat[self.rank][region.name])

    def source(self, tensor: torch.Tensor) -> None:
        pass

    def put(self, region, src, src_rows, dst_rows, dest, targets, signal, epoch) -> None:
        assert signal in self.signal_names, signal
        raw = src.contiguous().view(torch.uint8)  # [rows, row bytes], as NVSHMEM moves them
        for target in targets:
            sel = dest == target
            if bool(sel.any()):
                dst = region.on(self.w.flat[target][region.name]).view(torch.uint8)
                dst[dst_rows[sel]] = raw[src_rows[sel]]
        with self.w.cond:
            for target in targets:
                self.w.signals[(target, signal, self.rank)] = int(epoch)
            self.w.cond.notify_all()

    def wait(self, signal: str, sources: Sequence[int], epoch) -> None:
        epoch = int(epoch)
        if self.status.record is not None:
            return  # an earlier wait of this call gave up: later ones return at once
        deadline = time.monotonic() + self.timeout_s
        with self.w.cond:
            for source in sources:
                while self.w.signals.get((self.rank, signal, source), 0) < epoch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.status.fail(signal, source, epoch)
                        return
                    self.w.cond.wait(left)

    def check(self, about_rank=None) -> None:
        record, self.status.record = self.status.record, None
        if record is not None:
            raise timeout_error(self.rank, self.per_node, self.world, record, self.timeout_s,
                                about_rank)

    def close(self) -> None:
        pass
