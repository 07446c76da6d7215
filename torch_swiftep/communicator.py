"""The user-facing object: one per rank, built once from a process group, outside any graph."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.distributed as dist

from .agreement import Agreement, CallLedger, config_fingerprint
from .backends.cpu import check_index_values
from .ops import BY_NAME as CONTRACTS
from .ops._checks import check_low_latency_windows
from .ops.protocol import EPOCH_CAPACITY, EPOCH_SLOTS, FP8_BLOCK, FP8_DTYPE, plan_value
from .plan import WINDOW_UNDER_COMPILE, CommConfig, Plan, ctrl_region, typed_region
from .results import DispatchResult, LowLatencyDispatchResult, PendingCall, tensors_in
from .status import BrokenCommunicatorError, SwiftepError, raise_if_error
from .symmetric import SegmentTables, symmetric_workspace


class Communicator:
    """Expert-parallel dispatch/combine over one process group.

    Rank r owns experts [r * E / W, (r + 1) * E / W). Build it once per (group, shape config),
    before compiling or capturing; every method is a thin wrapper over torch.ops.swiftep.*.

    group: the process group (None: a world of one). On CUDA the workspace is allocated from
        torch.distributed._symmetric_memory and rendezvoused over the group (one node), or,
        with config.ranks_per_node < world, NVSHMEM runs the schedules across nodes
        (scale_out/); on CPU the ops run the gloo implementation.
    config: CommConfig (shapes, capacity, SM budget, timeout).
    device: where the workspace lives (default: the current CUDA device if CUDA is available
        and the group's backend is not gloo-only, else CPU).
    """

    def __init__(self, group: Optional[dist.ProcessGroup], config: CommConfig,
                 device: Optional[torch.device] = None):
        if group is None:
            rank, world, group_name = 0, 1, ""
        else:
            rank, world, group_name = group.rank(), group.size(), group.group_name
        device = torch.device(device) if device is not None else _default_device(group)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        plan = Plan.build(config, rank, world)
        agreement = None
        if world > 1:  # every rank built the same configuration, before anything is allocated
            agreement = Agreement(group, config.timeout_s, config.ranks_per_node)
            agreement.check_same_config(config_fingerprint(config, device))
        host_status, symm = None, None
        if device.type == "cuda" and world > 1 and (config.ranks_per_node or world) < world:
            self._start_scale_out(group, config, plan, device, agreement)
            return
        if device.type == "cuda" and world > 1:
            workspace, peer_ptrs, symm = symmetric_workspace(plan, group, device)
        else:
            workspace = torch.zeros(plan.workspace_bytes, dtype=torch.uint8, device=device)
            peer_ptrs = torch.tensor([workspace.data_ptr()] if device.type == "cuda" else [],
                                     dtype=torch.int64, device=device)
        if device.type == "cuda":
            host_status = _attach_host_status(workspace, plan)
            if world > 1:
                dist.barrier(group)  # every rank's ctrl region is zeroed before anyone writes
        self._init(config, plan, workspace, peer_ptrs, group_name, host_status)
        # CPU backend: every call first agrees that all ranks are there with good inputs. CUDA:
        # only on the error path (a rejection is posted, a peer's timeout names its reason).
        self._agreement = agreement
        self._symm = symm  # peers' workspaces, for announcing a failure (ctrl.abort)

    def _start_scale_out(self, group, config, plan, device, agreement) -> None:
        """Several nodes on CUDA: the throughput ops run the hierarchical schedule over NVSHMEM
        (scale_out/); no torch symmetric memory (it does not span nodes)."""
        from .scale_out import start_nvshmem

        empty = torch.zeros(0, dtype=torch.uint8, device=device)
        self._init(config, plan, empty, torch.zeros(0, dtype=torch.int64, device=device),
                   group.group_name, None)
        self._agreement = agreement
        self._scale_out = start_nvshmem(group, config, plan.rank, plan.world_size,
                                        plan.capacity, about_rank=agreement.rejection_of)

    @classmethod
    def emulated_world(cls, config: CommConfig, world_size: int,
                       device: torch.device) -> list["Communicator"]:
        """W communicators inside one process on one GPU, each with its own workspace and a
        hand-built peer table (for benchmarks: each rank on its own stream, with SM budgets
        that fit side by side). Needs CUDA_MODULE_LOADING=EAGER set before CUDA initializes:
        ranks spin on each other's flags, and a lazy kernel load synchronizes the context, so a
        first launch behind a spinning rank would stall until the timeout."""
        if device.type == "cuda" and os.environ.get("CUDA_MODULE_LOADING") != "EAGER":
            raise RuntimeError(
                "Communicator.emulated_world runs several ranks in one process: set "
                "CUDA_MODULE_LOADING=EAGER in the environment before CUDA initializes "
                f"(found {os.environ.get('CUDA_MODULE_LOADING')!r})")
        plans = [Plan.build(config, r, world_size) for r in range(world_size)]
        workspaces = [torch.zeros(p.workspace_bytes, dtype=torch.uint8, device=device)
                      for p in plans]
        peer_ptrs = torch.tensor([w.data_ptr() for w in workspaces], dtype=torch.int64,
                                 device=device)
        comms = []
        for plan, workspace in zip(plans, workspaces):
            comm = cls.__new__(cls)
            host_status = _attach_host_status(workspace, plan) if device.type == "cuda" else None
            comm._init(config, plan, workspace, peer_ptrs, "", host_status)
            comms.append(comm)
        return comms

    def _init(self, config, plan, workspace, peer_ptrs, group_name, host_status):
        self.config = config
        self.plan = plan
        self.rank, self.world_size = plan.rank, plan.world_size
        self.num_local_experts = plan.num_local_experts
        self.device = workspace.device
        self.workspace = workspace
        self.peer_ptrs = peer_ptrs
        self.group_name = group_name
        self._plan_list = plan.as_list()
        self._host_status = host_status
        self._agreement = None
        self._symm = None
        self._scale_out = None  # several nodes on CUDA: scale_out.ScaleOutRank
        self._broken: Optional[str] = None  # CUDA: why this communicator must be rebuilt
        self._ledger = CallLedger()
        self._segments = SegmentTables(self.world_size, (group_name, str(workspace.device)))
        if workspace.is_cuda:
            # The workspace never moves: compiled graphs (and CUDA graph trees under
            # mode="reduce-overhead") may keep its address instead of copying it in.
            torch._dynamo.mark_static_address(workspace)
            torch._dynamo.mark_static_address(peer_ptrs)

    # ------------------------------------------------------------------ throughput path
    def dispatch_layout(self, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
        """Counts of this rank's routing, local (no communication): (num_tokens_per_rank
        [world_size] int32, num_tokens_per_expert [num_experts] int32, is_token_in_rank
        [num_tokens, world_size] bool). topk_idx: [num_tokens, K] int64/int32, -1 = none."""
        args = (topk_idx, self.config.num_experts, self.world_size)
        CONTRACTS["dispatch_layout"].check(*args)
        return torch.ops.swiftep.dispatch_layout(*args)

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                 x_scales: Optional[torch.Tensor] = None, quantize_fp8: bool = False,
                 num_sms: Optional[int] = None) -> DispatchResult:
        """Send every token to the ranks owning its top-k experts (throughput schedule).

        x: [num_tokens, hidden] bf16/fp16/fp32, or float8_e4m3fn with x_scales
            [num_tokens, hidden / 128] float32. num_tokens <= max_tokens_per_rank, may be 0.
        topk_idx: [num_tokens, K] int64/int32, -1 = no expert. topk_weights: [num_tokens, K]
            float32.
        quantize_fp8: quantize a bf16/fp16/fp32 x to FP8 e4m3 (per-token per-128-channel
            scales) as it is sent, inside the dispatch kernel: half the bytes on the wire and
            no extra kernels. recv_x is then float8_e4m3fn with recv_scales.
        """
        if self._scale_out is not None:
            handle = self._call("dispatch", x, x_scales, topk_idx, topk_weights,
                                *self._state(num_sms), quantize_fp8, op=lambda *_: (
                                    self._scale_out.dispatch(x, topk_idx, topk_weights,
                                                             x_scales=x_scales,
                                                             quantize_fp8=quantize_fp8)))
            return handle._replace(comm_id=self._ledger.comm_id,
                                   call=self._ledger.handle_call("dispatch"))
        offsets, token_rows = self._call("dispatch", x, x_scales, topk_idx, topk_weights,
                                         *self._state(num_sms), quantize_fp8)
        cap, hidden = self.plan.capacity, self.config.hidden
        p = self._plan_list
        fp8 = quantize_fp8 or x.dtype == FP8_DTYPE
        return DispatchResult(
            recv_x=typed_region(self.workspace, p, "off_recv_x", FP8_DTYPE if fp8 else x.dtype,
                                (cap, hidden)),
            recv_scales=None if not fp8 else typed_region(
                self.workspace, p, "off_recv_scales", torch.float32, (cap, hidden // FP8_BLOCK)),
            recv_src=typed_region(self.workspace, p, "off_recv_src", torch.int32, (cap, 2)),
            recv_weights=typed_region(self.workspace, p, "off_recv_weights", torch.float32,
                                      (cap,)),
            expert_offsets=offsets,
            token_rows=token_rows,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            comm_id=self._ledger.comm_id,
            call=self._ledger.handle_call("dispatch"),
        )

    @torch.compiler.disable(reason=WINDOW_UNDER_COMPILE)
    def combine_buffer(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """[capacity, hidden] view of this rank's combine window. Experts that write their
        outputs here (row i for dispatch row i) make combine zero-copy. Not inside
        torch.compile (plan.WINDOW_UNDER_COMPILE says why): there, pass the experts' tensor to
        combine, which stages it."""
        if self._scale_out is not None:
            return self._scale_out.combine_buffer(dtype or self.config.dtype)
        return typed_region(self.workspace, self._plan_list, "off_combine_x",
                            dtype or self.config.dtype, (self.plan.capacity, self.config.hidden))

    def expert_output_pool(self):
        """Context manager for the experts' output of combine(..., symmetric=True), read in
        place (no copy). Its first entry is collective (symmetric.py: SegmentTables). Across
        nodes on CUDA combine reads any tensor in place: a context that changes nothing."""
        if self._scale_out is not None:
            return contextlib.nullcontext()
        return self._segments.pool(self)

    def combine(self, expert_out: torch.Tensor, handle: DispatchResult, *,
                topk_weights: Optional[torch.Tensor] = None, num_sms: Optional[int] = None,
                symmetric: bool = False) -> torch.Tensor:
        """y[n] = sum_k w[n, k] * expert_out_owner[row(n, k)] (float32 accumulation), in
        expert_out's dtype. expert_out: [capacity, hidden], row i the output of dispatch row i
        (use combine_buffer() to skip a copy); topk_weights defaults to the dispatch's.
        symmetric=True: expert_out was allocated inside expert_output_pool() and is read where
        it is (swiftep::combine_symmetric). The first symmetric combine is one on every rank;
        after it, ranks may mix plain and symmetric combines (symmetric.py)."""
        self._ledger.check_handle(handle, "dispatch")
        weights = handle.topk_weights if topk_weights is None else topk_weights
        routing = (handle.topk_idx, weights, handle.token_rows, handle.expert_offsets,
                   *self._state(num_sms))
        if symmetric is not True and symmetric is not False:
            raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
        if self._scale_out is not None:  # any expert_out is read in place: symmetric or not
            return self._call("combine", expert_out, *routing,
                              op=lambda *_: self._scale_out.combine(expert_out, handle,
                                                                    topk_weights=weights))
        if self.config.combine_partials:  # expert_out read where it is, any tensor
            return self._call("combine", expert_out, *routing, refused=None
                              if weights is handle.topk_weights else ValueError(
                                  "topk_weights: combine_partials=True combines with the "
                                  "weights dispatch sent (got another tensor)"))
        # symmetric path engaged: a plain combine, too, says where its rows are (staged)
        table = (self._segments.table(self, expert_out, routing) if symmetric
                 else self._segments.plain_table(self))
        if table is not None:
            return self._call("combine_symmetric", expert_out, *table, *routing)
        return self._call("combine", expert_out, *routing)

    # ---------------------------------------------------------------- low-latency path
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                             topk_weights: torch.Tensor, *,
                             x_scales: Optional[torch.Tensor] = None, quantize_fp8: bool = False,
                             num_sms: Optional[int] = None) -> LowLatencyDispatchResult:
        """Decode schedule: static output shapes, one pass, CUDA-graph capturable.
        Arguments as dispatch(); num_tokens <= ll_max_tokens_per_rank."""
        if self._scale_out is not None:  # across nodes: direct puts over NVSHMEM
            handle = self._call("low_latency_dispatch", x, x_scales, topk_idx, topk_weights,
                                *self._state(num_sms), quantize_fp8, op=lambda *_: (
                                    self._scale_out.low_latency_dispatch(
                                        x, topk_idx, topk_weights, x_scales=x_scales,
                                        quantize_fp8=quantize_fp8)))
            return handle._replace(comm_id=self._ledger.comm_id,
                                   call=self._ledger.handle_call("low_latency_dispatch"))
        counts, token_rows = self._call("low_latency_dispatch", x, x_scales, topk_idx,
                                        topk_weights, *self._state(num_sms), quantize_fp8)
        local, rows, hidden = self.num_local_experts, self.plan.ll_rows_per_expert, \
            self.config.hidden
        p = self._plan_list
        fp8 = quantize_fp8 or x.dtype == FP8_DTYPE
        return LowLatencyDispatchResult(
            recv_x=typed_region(self.workspace, p, "off_ll_recv_x", FP8_DTYPE if fp8 else x.dtype,
                                (local, rows, hidden)),
            recv_scales=None if not fp8 else typed_region(
                self.workspace, p, "off_ll_recv_scales", torch.float32,
                (local, rows, hidden // FP8_BLOCK)),
            recv_src=typed_region(self.workspace, p, "off_ll_recv_src", torch.int32,
                                  (local, rows, 2)),
            recv_weights=typed_region(self.workspace, p, "off_ll_recv_weights", torch.float32,
                                      (local, rows)),
            recv_counts=counts,
            token_rows=token_rows,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            comm_id=self._ledger.comm_id,
            call=self._ledger.handle_call("low_latency_dispatch"),
        )

    @torch.compiler.disable(reason=WINDOW_UNDER_COMPILE)
    def low_latency_combine_buffer(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """[L, world_size * ll_max_tokens_per_rank, hidden] view of the low-latency combine
        window (zero-copy combine when experts write here; not inside torch.compile, as
        combine_buffer)."""
        check_low_latency_windows(self._plan_list)
        if self._scale_out is not None:
            return self._scale_out.low_latency_combine_buffer(dtype or self.config.dtype)
        return typed_region(self.workspace, self._plan_list, "off_ll_combine_x",
                            dtype or self.config.dtype,
                            (self.num_local_experts, self.plan.ll_rows_per_expert,
                             self.config.hidden))

    def low_latency_combine(self, expert_out: torch.Tensor, handle: LowLatencyDispatchResult,
                            *, topk_weights: Optional[torch.Tensor] = None,
                            num_sms: Optional[int] = None) -> torch.Tensor:
        """Weighted combine of the low-latency layout; expert_out: [L, S, hidden]."""
        self._ledger.check_handle(handle, "low_latency_dispatch")
        weights = handle.topk_weights if topk_weights is None else topk_weights
        return self._call("low_latency_combine", expert_out, handle.topk_idx, weights,
                          handle.token_rows, handle.recv_counts, *self._state(num_sms),
                          op=None if self._scale_out is None else lambda *_: (
                              self._scale_out.low_latency_combine(expert_out, handle,
                                                                  topk_weights=weights)))

    # ------------------------------------------------------------------------- overlap
    def start(self, method, *args, **kwargs) -> PendingCall:
        """Issue method(*args, **kwargs) (dispatch, combine, low_latency_dispatch or
        low_latency_combine of this communicator) on a side stream, after the work already
        queued on the current stream, and return at once. The caller overlaps other work and
        then calls .wait() for the result:

            pending = comm.start(comm.low_latency_dispatch, x, topk_idx, topk_weights)
            shared = shared_expert(x)        # runs beside the dispatch
            handle = pending.wait()

        Works under CUDA graph capture (fork/join through events). On CPU the call runs
        synchronously and wait() just returns its result."""
        if getattr(method, "__self__", None) is not self:
            raise ValueError("start() takes a method of this Communicator, e.g. "
                             f"comm.low_latency_dispatch; got {method!r}")
        if self.device.type != "cuda":
            return PendingCall(method(*args, **kwargs), None)
        if getattr(self, "_side_stream", None) is None:
            self._side_stream = torch.cuda.Stream(self.device)
        side, current = self._side_stream, torch.cuda.current_stream(self.device)
        side.wait_stream(current)  # the inputs are ready
        with torch.cuda.stream(side):
            result = method(*args, **kwargs)
        for t in tensors_in(list(args) + list(kwargs.values())):
            t.record_stream(side)  # the caller may free its inputs before the side stream is done
        event = torch.cuda.Event()
        event.record(side)
        return PendingCall(result, event)

    # ------------------------------------------------------------------------- helpers
    def check(self) -> None:
        """Wait for this rank's queued work and raise SwiftepError if a kernel reported one
        (capacity overflow, index out of range, a rank that never arrived)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self._check_status()
        if self._scale_out is not None:  # what the low-latency calls recorded
            self._scale_out.check()

    def epochs(self) -> tuple[int, int]:
        """(throughput calls, low-latency calls) this workspace has seen. Syncs."""
        if self._scale_out is not None:
            return (self._scale_out.schedule.dispatch_epoch,
                    int(self._scale_out.low_latency.epoch))  # its dispatches and combines
        e = ctrl_region(self.workspace, self._plan_list, "epoch", torch.int64,
                        (EPOCH_CAPACITY,))
        return (int(e[EPOCH_SLOTS.index("throughput")]),
                int(e[EPOCH_SLOTS.index("low_latency")]))

    def _check_status(self) -> None:
        if torch.compiler.is_compiling():
            return
        if self._broken is not None:
            raise BrokenCommunicatorError(f"rank {self.rank}: this communicator is broken "
                                          f"({self._broken}); build a new one")
        if self._host_status is None:
            return
        about = self._agreement.rejection_of if self._agreement is not None else None
        try:
            raise_if_error(self._host_status, self.rank, about_rank=about,
                           ranks_per_node=self.config.ranks_per_node, world=self.world_size)
        except BrokenCommunicatorError as exc:  # a timeout or a peer's failure: calls disagree
            self._broken = str(exc)
            raise

    def _announce_failure(self, name: str, call: int, error: BaseException) -> None:
        """CUDA, world > 1: this rank rejected call `call`'s inputs, so its peers' kernels
        would wait for it until timeout_s. Post the reason (the store), then write 1 + rank
        into every peer's ctrl.abort (their waits give up at once, naming this rank), and mark
        this communicator broken: the ranks' call counters no longer agree."""
        self._agreement.post_rejection(name, call, error)
        self._broken = (f"rank {self.rank} rejected its inputs for {name} call {call} "
                        f"({type(error).__name__}: {error}) and its peers gave that call up")
        if self._symm is None or torch.cuda.is_current_stream_capturing():
            return
        offset = plan_value(self._plan_list, "off_ctrl_abort") // 8
        for peer in range(self.world_size):
            if peer != self.rank:
                self._symm.get_buffer(peer, (1,), torch.int64, offset).fill_(self.rank + 1)

    def _state(self, num_sms: Optional[int]) -> tuple:
        """The communicator arguments every communication op takes after its tensors."""
        return (self.workspace, self.peer_ptrs, self.group_name, self._plan_list,
                self.config.num_sms if num_sms is None else num_sms)

    def _call(self, name: str, *args, refused: Optional[Exception] = None, op=None):
        """Raise a reported kernel error, run the op's contract checks (ops/), agree with the
        other ranks (CPU backend), then the op (or op(*args), across nodes). refused: the
        caller's own check failed."""
        self._check_status()
        if torch.compiler.is_compiling():  # traced: the checks and the op, no bookkeeping
            if refused is not None:
                raise refused
            CONTRACTS[name].check(*args)
            return (op or getattr(torch.ops.swiftep, name))(*args)  # across nodes: a graph break
        error = refused
        try:
            CONTRACTS[name].check(*args)
            if name.endswith("dispatch") and (self.device.type == "cpu" or (
                    op is not None and not torch.cuda.is_current_stream_capturing())):
                check_index_values(args[2], self.config.num_experts)  # before any collective
        except (ValueError, TypeError, IndexError) as exc:
            error = exc
        call = self._ledger.next_call(name, ok=error is None)
        if self._agreement is not None and self.device.type == "cpu":
            self._agreement.before_call(name, call, error)
        elif self._agreement is not None and error is not None:
            self._announce_failure(name, call, error)
        if error is not None:
            raise error
        try:
            return (op or getattr(torch.ops.swiftep, name))(*args)
        except RuntimeError as exc:
            if self._agreement is None or self.device.type != "cpu" or \
                    isinstance(exc, SwiftepError):
                raise
            raise self._agreement.after_failure(name, call, exc) from exc


def _default_device(group) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if group is not None and "nccl" not in str(dist.get_backend(group)) and \
            "cuda" not in str(dist.get_backend(group)):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _attach_host_status(workspace: torch.Tensor, plan: Plan) -> torch.Tensor:
    """A pinned host mirror of ctrl.status, its address stored in ctrl.host_status_ptr so
    kernels can report errors the host reads without a sync."""
    host_status = torch.zeros(4, dtype=torch.int64).pin_memory()
    ptr = ctrl_region(workspace, plan.as_list(), "host_status_ptr", torch.int64, (1,))
    ptr.fill_(host_status.data_ptr())
    return host_status
