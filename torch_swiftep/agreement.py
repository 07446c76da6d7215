"""Bounded, attributed agreement between the ranks of a communicator, over the group's store.

Host-side waits for other ranks go through here, so each ends within timeout_s with a
SwiftepError that names the ranks waited for and the call, never a raw backend message:

- at construction, every rank posts a fingerprint of its configuration and compares it with
  every other rank's (a mismatch names the field and each rank's value);
- on the CPU backend, before each call's first collective, every rank posts whether its inputs
  passed their checks; a rank that rejected its inputs makes the others raise at once, naming
  it and its reason, and a rank that never arrives is named after timeout_s. Only then do the
  gloo collectives start, with every rank known to be there.

Keys live in the process group's c10d store (the one init_process_group made) under a prefix
unique to the communicator: communicators of one group must be built in the same order on
every rank, as any collective must.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist

from .status import REBUILD, BrokenCommunicatorError, SwiftepError

# Polling interval of a wait: starts short (a call's agreement usually completes within a
# millisecond) and backs off so a long wait does not hammer the store.
POLL_FIRST_S, POLL_MAX_S = 1e-4, 0.02
_INSTANCES: dict = defaultdict(itertools.count)  # group name -> communicators built so far
GAVE_UP = "gave up waiting"  # in a verdict: a rank's wait for the others ran out
GO = "go"  # the verdict when every rank arrived with good inputs


class Agreement:
    """One communicator's view of the store: rank, world, timeout and a unique key prefix."""

    def __init__(self, group: dist.ProcessGroup, timeout_s: float,
                 ranks_per_node: Optional[int] = None):
        self.rank, self.world = group.rank(), group.size()
        self.ranks_per_node = ranks_per_node  # names each rank's node when there are several
        self.group_ranks = dist.get_process_group_ranks(group)
        self.timeout_s = timeout_s
        self.store = dist.distributed_c10d._get_default_store()
        self.prefix = f"swiftep/{group.group_name}/{next(_INSTANCES[group.group_name])}"
        self.broken: Optional[str] = None
        self._arrivals = itertools.count(1)  # arrive() calls so far, the same on every rank

    # --------------------------------------------------------------------------- helpers
    def _key(self, *parts) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def _ranks_text(self, ranks) -> str:
        """Group ranks, with the global rank where it differs (a subgroup) and the node where
        the world has several."""
        several_nodes = bool(self.ranks_per_node) and self.ranks_per_node < self.world
        names = []
        for r in ranks:
            notes = [f"global {self.group_ranks[r]}"] if self.group_ranks[r] != r else []
            notes += [f"node {r // self.ranks_per_node}"] if several_nodes else []
            names.append(f"{r} ({', '.join(notes)})" if notes else str(r))
        return ("rank " if len(names) == 1 else "ranks ") + ", ".join(names)

    def _store_op(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # the store's host (rank 0 of the job) is gone
            self.broken = f"the process group's store stopped answering ({what}): {exc}"
            raise BrokenCommunicatorError(
                f"rank {self.rank}: {self.broken}; global rank 0 hosts it and has probably "
                "exited. Rebuild the process group") from None

    def _missing(self, keys: list[str], what: str) -> str:
        missing = [r for r, k in enumerate(keys) if not self._store_op(what, self.store.check, [k])]
        return (f"{self._ranks_text(missing)} never arrived at {what} within "
                f"timeout_s={self.timeout_s:g}")

    def _broken(self, message: str) -> BrokenCommunicatorError:
        self.broken = message
        return BrokenCommunicatorError(f"rank {self.rank}: {message}; {REBUILD}")

    def _poll(self, ready, what: str, on_deadline):
        """ready() until it returns a value (not None), bounded by timeout_s; then
        on_deadline() decides (it returns a value to use, or raises)."""
        deadline = time.monotonic() + self.timeout_s
        pause = POLL_FIRST_S
        while True:
            value = ready()
            if value is not None:
                return value
            if time.monotonic() > deadline:
                return on_deadline()
            time.sleep(pause)
            pause = min(2 * pause, POLL_MAX_S)

    # ------------------------------------------------------------------------ the protocol
    def check_same_config(self, fields: dict) -> None:
        """Raise, on every rank, if any rank's fields differ: names each field and its values."""
        keys = [self._key("config", r) for r in range(self.world)]
        what = "the Communicator's configuration check"
        self._store_op(what, self.store.set, keys[self.rank], json.dumps(fields))

        def deadline():
            raise self._broken(self._missing(keys, what))
        self._poll(lambda: True if self._store_op(what, self.store.check, keys) else None, what,
                   deadline)
        values = [json.loads(v) for v in self._store_op("config", self.store.multi_get, keys)]
        problems = []
        for name in fields:
            by_value = defaultdict(list)
            for r, v in enumerate(values):
                by_value[json.dumps(v.get(name))].append(r)
            if len(by_value) > 1:
                seen = "; ".join(f"{self._ranks_text(rs)}: {json.loads(v)}"
                                 for v, rs in by_value.items())
                problems.append(f"{name} differs ({seen})")
        if problems:
            raise ValueError(f"rank {self.rank}: the ranks built their Communicators with "
                             f"different configurations: {'; '.join(problems)}")

    def before_call(self, op: str, call: int, error: Optional[BaseException]) -> None:
        """Agree on call `call` before its first collective. One verdict key decides it, set
        once (compare-and-set): "go" by the last rank to arrive, a rejection by a rank whose
        inputs failed their checks, or "gave up" by a rank whose wait ran out. Every rank acts
        on the same verdict, so no rank enters the exchange alone."""
        self._agree(("call", call), f"{op} call {call}", error)

    def arrive(self, what: str, error: Optional[BaseException] = None) -> None:
        """A bounded rendezvous outside the call protocol (before a collective of torch's, such
        as the symmetric-memory rendezvous of combine(symmetric=True)): returns once every rank
        has arrived at its n-th arrive() with good inputs. A rank that rejected its inputs
        (error) makes the others raise SwiftepError naming it and its reason; a rank that never
        arrives (it took another path) is named after timeout_s (BrokenCommunicatorError).
        The caller raises its own error. Ranks must arrive in the same order, as for any
        collective; `what` names the rendezvous in the messages."""
        self._agree(("arrive", next(self._arrivals)), what, error)

    def _agree(self, slot: tuple, what: str, error: Optional[BaseException]) -> None:
        """The verdict protocol of one rendezvous, keyed by slot = (kind, n), n counting up
        from 1 on every rank."""
        if self.broken is not None:
            raise BrokenCommunicatorError(f"rank {self.rank}: this communicator is broken "
                                          f"({self.broken}); build a new one")
        verdict_key = self._key(*slot, "verdict")
        if error is not None:
            reason = f"rank {self.rank} rejected its inputs ({type(error).__name__}: {error})"
            self._store_op(what, self.store.compare_set, verdict_key, "", reason)
            return  # the caller raises its own error
        keys = [self._key(*slot, r) for r in range(self.world)]
        self._store_op(what, self.store.set, keys[self.rank], what)  # names the missing later
        arrived = self._store_op(what, self.store.add, self._key(*slot, "count"), 1)
        if arrived == self.world:
            self._store_op(what, self.store.compare_set, verdict_key, "", GO)

        def ready():
            if self._store_op(what, self.store.check, [verdict_key]):
                return self._store_op(what, self.store.get, verdict_key).decode()
            return None

        def deadline():  # the verdict is ours to give, unless someone gave it just now
            message = f"rank {self.rank} {GAVE_UP}: {self._missing(keys, what)}"
            return self._store_op(what, self.store.compare_set, verdict_key, "",
                                  message).decode()
        verdict = self._poll(ready, what, deadline)
        if verdict != GO:
            if GAVE_UP in verdict:
                raise self._broken(f"{what}: {verdict}")
            raise SwiftepError(f"rank {self.rank}: {what}: {verdict}")
        kind, n = slot
        if n >= 3:  # everyone read n - 2's verdict before arriving at n - 1
            old = [self._key(kind, n - 2, self.rank)]
            if self.rank == 0:
                old += [self._key(kind, n - 2, name) for name in ("count", "verdict")]
            for key in old:
                self._store_op(what, self.store.delete_key, key)

    def post_rejection(self, op: str, call: int, error: BaseException) -> None:
        """CUDA backend: remember why this rank rejected a call's inputs, so a peer whose kernel
        then times out waiting for it can say why (no store traffic on the fast path)."""
        reason = f"rank {self.rank} rejected its inputs for {op} call {call} " \
                 f"({type(error).__name__}: {error})"
        try:
            self.store.set(self._key("rejected", self.rank), reason)
        except Exception:  # best effort: the error itself is raised by the caller anyway
            pass

    def rejection_of(self, peer: int) -> Optional[str]:
        """What `peer` posted with post_rejection, if anything (the error path only)."""
        key = self._key("rejected", peer)
        try:
            return self.store.get(key).decode() if self.store.check([key]) else None
        except Exception:
            return None

    def after_failure(self, op: str, call: int, exc: BaseException) -> BrokenCommunicatorError:
        """A collective of the call failed (a peer died mid-exchange): the error to raise."""
        self.broken = f"{op} call {call} failed in the exchange with the other ranks"
        return BrokenCommunicatorError(
            f"rank {self.rank}: {self.broken} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); a peer failed or exited "
            "mid-call: this communicator must be rebuilt")


def config_fingerprint(config, device: torch.device) -> dict:
    """What every rank of a communicator must agree on: its configuration, field by field, and
    the kind of device its workspace lives on."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields["dtype"] = str(fields["dtype"])
    fields["device type"] = device.type
    return fields


class CallLedger:
    """Call numbers of one Communicator: every call gets the next one (the same on every rank,
    so ranks agree on which call they are in), and each schedule remembers its latest dispatch
    so combine can refuse a handle from another communicator or an older dispatch. Eager calls
    only: under torch.compile and in CUDA-graph replays the numbers do not move (a traced
    dispatch's handle carries call -1 and is not checked)."""

    _ids = itertools.count()

    def __init__(self):
        self.comm_id = next(self._ids)
        self.calls = 0
        self.last_dispatch = {"dispatch": 0, "low_latency_dispatch": 0}

    def next_call(self, op: str, ok: bool) -> int:
        self.calls += 1
        if ok and op in self.last_dispatch:
            self.last_dispatch[op] = self.calls
        return self.calls

    def handle_call(self, dispatch_op: str) -> int:
        return -1 if torch.compiler.is_compiling() else self.last_dispatch[dispatch_op]

    def check_handle(self, handle, dispatch_op: str) -> None:
        if torch.compiler.is_compiling() or handle.call == -1:
            return
        if handle.comm_id != self.comm_id:
            raise ValueError(f"the handle comes from another Communicator (#{handle.comm_id}); "
                             f"combine on the one that dispatched it (this is #{self.comm_id})")
        latest = self.last_dispatch[dispatch_op]
        if handle.call != latest:
            raise ValueError(f"stale handle: it comes from call {handle.call} ({dispatch_op}), "
                             f"but the {dispatch_op} of call {latest} has since overwritten the "
                             "windows; combine each dispatch before the next one")
