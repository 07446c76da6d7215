"""The workspace layout of one rank: configuration, region offsets and the integer list the
ops carry.

``Plan`` computes the values of the ``int[] plan`` every communication op takes; the order and
meaning of its fields, the control fields and every other number the kernels must agree on are
the protocol in ``ops/protocol.py`` (the C++ header is generated from it).

One workspace per rank, one fused allocation (symmetric across ranks on GPUs): the regions of
``protocol.REGIONS`` in order, then the ctrl region (``protocol.CTRL_FIELDS``). All regions are
aligned to ``REGION_ALIGN`` bytes so bulk copies (16-byte granularity) and vector loads can
address any of them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .ops.protocol import (  # noqa: F401  (re-exported: callers of the layout use them)
    CTRL_ALIGN,
    CTRL_FIELDS,
    FP8_AMAX_FLOOR,
    FP8_BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    FP8_SCALE_PER_AMAX,
    PLAN_FIELDS,
    PLAN_INDEX,
    REGION_ALIGN,
    REGIONS,
    SUPPORTED_DTYPES,
    TRACE_CALLS,
    TRACE_POINTS,
    plan_value,
)


def _align(n: int) -> int:
    return (n + REGION_ALIGN - 1) // REGION_ALIGN * REGION_ALIGN


def ctrl_offsets(world_size: int, num_experts: int) -> tuple[dict[str, int], int]:
    """Byte offsets of CTRL_FIELDS inside the ctrl region, and the region's size."""
    offsets, pos = {}, 0
    for name, elem_bytes, count in CTRL_FIELDS:
        pos = (pos + CTRL_ALIGN - 1) // CTRL_ALIGN * CTRL_ALIGN
        offsets[name] = pos
        pos += elem_bytes * count(world_size, num_experts)
    return offsets, _align(pos)


@dataclasses.dataclass(frozen=True)
class CommConfig:
    """What a communicator is sized for. Every field is checked in ``__post_init__``.

    num_experts: E, total experts over all ranks (``E % world_size == 0``).
    hidden: H, channels of a token.
    num_topk: K, experts per token (``K <= E``).
    max_tokens_per_rank: T, most tokens one rank dispatches in one call.
    dtype: activation dtype the windows are sized for (bf16, fp16 or fp32); FP8 dispatch
        uses the same windows at one byte per element.
    capacity: rows of each rank's throughput window. ``None``: the worst case of routings
        without repeated experts, ``world_size * T * min(K, E / world_size)`` (a token that
        names one expert twice takes one row per slot, up to K on one rank: size the window
        for it). A smaller value saves memory; a call whose routing needs more rows raises
        (nothing is written past the window).
    ll_max_tokens_per_rank: tokens per rank of the low-latency (decode) windows; 0 = none.
    num_sms: SMs the communication kernels may use (the rest stays with the GEMMs).
    timeout_s: bound of every wait for another rank, host or device.
    ranks_per_node: ranks of one node (NVLink domain); ranks r and r' share a node when
        r // ranks_per_node == r' // ranks_per_node. None: the whole world is one node. Across
        nodes the throughput schedule sends a token once per destination node and forwards it
        inside the node, the low-latency one puts directly (CPU backend over gloo; CUDA over
        NVSHMEM: docs/api.md, "Across nodes on CUDA").
    dispatch_fanout: the throughput dispatch sends a token's row over the link once per remote
        rank (into the lowest of its rows there) and that rank copies it into the token's other
        rows: fewer link bytes (4x fewer at 128 experts per rank, top-8), more copies by the
        communication SMs. Same rows, same bits (docs/design.md, "NVLink bytes of expert-major
        rows"). Off by default.
    combine_partials: the throughput combine reduces a token's slots on each owner rank, reading
        expert_out where it is (no staging copy, any tensor), and sends one partial per
        (token, owner rank), rounded to expert_out's dtype; the token's rank sums the partials
        in float32 in rank order: ``reference.combine(..., ranks_per_node=1)``, not the flat
        slot sum (docs/design.md, "Combine partials"). Combine uses the weights dispatch sent.
        One node only. Off by default.
    """

    num_experts: int
    hidden: int
    num_topk: int
    max_tokens_per_rank: int
    dtype: torch.dtype = torch.bfloat16
    capacity: Optional[int] = None
    ll_max_tokens_per_rank: int = 0
    num_sms: int = 24
    timeout_s: float = 60.0
    ranks_per_node: Optional[int] = None
    dispatch_fanout: bool = False
    combine_partials: bool = False

    def __post_init__(self):
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("num_experts", "hidden", "num_topk", "max_tokens_per_rank", "num_sms"):
            positive(name)
        if self.num_topk > self.num_experts:
            raise ValueError(
                f"num_topk={self.num_topk} is larger than num_experts={self.num_experts}"
            )
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype}")
        if (self.hidden * self.dtype.itemsize) % 16 != 0:
            raise ValueError(
                f"hidden={self.hidden} gives rows of {self.hidden * self.dtype.itemsize} bytes; "
                "rows must be a multiple of 16 bytes (bulk-copy granularity)"
            )
        if self.capacity is not None:
            positive("capacity")
        if self.ll_max_tokens_per_rank < 0:
            raise ValueError(
                f"ll_max_tokens_per_rank must be >= 0, got {self.ll_max_tokens_per_rank}"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if self.ranks_per_node is not None:
            positive("ranks_per_node")
        if not isinstance(self.dispatch_fanout, bool):
            raise ValueError(f"dispatch_fanout must be a bool, got {self.dispatch_fanout!r}")
        if not isinstance(self.combine_partials, bool):
            raise ValueError(f"combine_partials must be a bool, got {self.combine_partials!r}")

    @property
    def scale_cols(self) -> int:
        """FP8 scales per row (0 when hidden is not a multiple of FP8_BLOCK)."""
        return self.hidden // FP8_BLOCK if self.hidden % FP8_BLOCK == 0 else 0


def check_world(config: CommConfig, world_size: int) -> None:
    if not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if config.ranks_per_node is not None and world_size % config.ranks_per_node != 0:
        raise ValueError(f"world_size={world_size} is not a multiple of ranks_per_node="
                         f"{config.ranks_per_node} (every node has the same number of ranks)")
    if (config.combine_partials and config.ranks_per_node is not None
            and config.ranks_per_node < world_size):
        raise ValueError(f"combine_partials=True needs one node, got ranks_per_node="
                         f"{config.ranks_per_node} < world_size={world_size} (across nodes the "
                         "combine already sends one partial per (token, node))")
    if config.num_experts % world_size != 0:
        raise ValueError(
            f"num_experts={config.num_experts} is not divisible by world_size={world_size} "
            "(E % W must be 0: rank r owns experts [r*E/W, (r+1)*E/W))"
        )


def default_capacity(config: CommConfig, world_size: int) -> int:
    local = config.num_experts // world_size
    return world_size * config.max_tokens_per_rank * min(config.num_topk, local)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Geometry of one rank's workspace; ``as_list()`` is what the ops receive."""

    config: CommConfig
    rank: int
    world_size: int
    capacity: int
    offsets: dict
    ctrl: dict
    workspace_bytes: int

    @staticmethod
    def build(config: CommConfig, rank: int, world_size: int) -> "Plan":
        check_world(config, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
        capacity = config.capacity or default_capacity(config, world_size)
        local = config.num_experts // world_size
        ll_rows = local * world_size * config.ll_max_tokens_per_rank
        row_bytes = config.hidden * config.dtype.itemsize
        scale_bytes = config.scale_cols * 4
        region_bytes = dict(
            recv_x=capacity * row_bytes,
            recv_scales=capacity * scale_bytes,
            recv_src=capacity * 8,  # int32 (source rank, source token)
            recv_weights=capacity * 4,
            fanout_rows=world_size * config.max_tokens_per_rank * 8 if config.dispatch_fanout
            else 0,
            pair_rows=world_size * config.max_tokens_per_rank * config.num_topk * 8
            if config.combine_partials else 0,
            partials=world_size * config.max_tokens_per_rank * row_bytes
            if config.combine_partials else 0,
            combine_x=capacity * row_bytes,
            ll_recv_x=ll_rows * row_bytes,
            ll_recv_scales=ll_rows * scale_bytes,
            ll_recv_src=ll_rows * 8,
            ll_recv_weights=ll_rows * 4,
            ll_combine_x=ll_rows * row_bytes,
        )
        offsets, pos = {}, 0
        for name in REGIONS:  # the protocol's address order
            offsets[f"off_{name}"] = pos
            pos = _align(pos + region_bytes[name])
        ctrl, ctrl_bytes = ctrl_offsets(world_size, config.num_experts)
        offsets["off_ctrl"] = pos
        pos += ctrl_bytes
        return Plan(config, rank, world_size, capacity, offsets, ctrl, pos)

    @property
    def num_local_experts(self) -> int:
        return self.config.num_experts // self.world_size

    @property
    def ll_rows_per_expert(self) -> int:
        return self.world_size * self.config.ll_max_tokens_per_rank

    def as_list(self) -> list[int]:
        c = self.config
        values = dict(
            rank=self.rank,
            world_size=self.world_size,
            num_experts=c.num_experts,
            num_topk=c.num_topk,
            hidden=c.hidden,
            row_bytes=c.hidden * c.dtype.itemsize,
            capacity=self.capacity,
            max_tokens_per_rank=c.max_tokens_per_rank,
            ll_max_tokens_per_rank=c.ll_max_tokens_per_rank,
            timeout_ms=max(1, int(math.ceil(c.timeout_s * 1000))),
            ranks_per_node=c.ranks_per_node or self.world_size,
            dispatch_fanout=int(c.dispatch_fanout),
            combine_partials=int(c.combine_partials),
            workspace_bytes=self.workspace_bytes,
            **self.offsets,
            **{f"off_ctrl_{k}": self.offsets["off_ctrl"] + v for k, v in self.ctrl.items()},
        )
        return [values[name] for name in PLAN_FIELDS]


# ---------------------------------------------------------------- views of a workspace
def region(workspace: torch.Tensor, plan: list[int], name: str, nbytes: int) -> torch.Tensor:
    start = plan_value(plan, name)
    return workspace.narrow(0, start, nbytes)


def typed_region(workspace, plan, name, dtype, shape) -> torch.Tensor:
    numel = math.prod(shape)
    return region(workspace, plan, name, numel * dtype.itemsize).view(dtype).view(shape)


def ctrl_region(workspace, plan, field, dtype, shape) -> torch.Tensor:
    start = plan_value(plan, f"off_ctrl_{field}")
    numel = math.prod(shape)
    return workspace.narrow(0, start, numel * dtype.itemsize).view(dtype).view(shape)


# Why the combine windows are not handed out inside torch.compile: a write into a view of the
# workspace there is functionalized, and inductor then passes combine a temporary copy of the
# whole workspace (with the rows written), copying it back only after the combine (seen in the
# generated code), while the peers read this rank's real window through the peer table: stale
# rows, or a wait that times out. Outside a compiled region the write is in place.
WINDOW_UNDER_COMPILE = (
    "the combine window is not available inside torch.compile: a write into it there reaches "
    "combine as a temporary copy of the workspace, which the peers cannot see. Pass the "
    "experts' output tensor to combine / low_latency_combine (they stage it), or write the "
    "window and call combine outside the compiled region")
