"""The communication plan: configuration, workspace layout and the integer list the ops carry.

This module is the one place where the geometry of a rank's workspace is defined. The ops take
it as ``int[] plan`` (see ``ops/``); the CUDA side reads the same list through the generated
header ``csrc/include/swiftep/plan_fields.h`` (``python -m torch_swiftep.plan --emit-header``;
a test fails when the header is stale).

One workspace per rank, one fused allocation (symmetric across ranks on GPUs), laid out as::

    recv_x         [capacity, hidden] x dtype    dispatch lands here (expert-major rows)
    recv_scales    [capacity, hidden/128] f32    FP8 scales of recv_x rows
    recv_src       [capacity, 2] int32           (source rank, source token) of each row
    recv_weights   [capacity] f32                the token's weight for this row's expert
    combine_x      [capacity, hidden] x dtype    experts write outputs here; combine reads it
    ll_recv_x      [L, W*T_ll, hidden]           low-latency dispatch window
    ll_recv_scales [L, W*T_ll, hidden/128] f32
    ll_recv_src    [L, W*T_ll, 2] int32
    ll_recv_weights[L, W*T_ll] f32
    ll_combine_x   [L, W*T_ll, hidden]           low-latency expert outputs
    ctrl           counts, flags, epochs, status (CTRL_FIELDS below)

All regions are aligned to ``REGION_ALIGN`` bytes so bulk copies (16-byte granularity) and
vector loads can address any of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import struct
from typing import Optional

import torch

# Bulk copies and 16-byte vector accesses need 16-byte alignment; 128 also keeps every
# region on its own cache lines so flags never share a line with data.
REGION_ALIGN = 128
# DeepSeek-V3 FP8 recipe: one float32 scale per token per 128 channels. With
# a = max(amax, FP8_AMAX_FLOOR): q = e4m3(x * (FP8_MAX / a)), scale = a * FP8_SCALE_PER_AMAX
# (x ~= q * scale). The CUDA dispatch that quantizes in-kernel reads the same numbers from the
# generated header and does the same IEEE-rounded operations, so both give identical bytes.
# One division per block, not per element (the kernel's cost), and never a division by a Python
# scalar: torch on CUDA turns that into a product with the reciprocal and on CPU does not.
FP8_BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
FP8_SCALE_PER_AMAX = struct.unpack("f", struct.pack("f", 1.0 / FP8_MAX))[0]  # float32(1 / 448)
FP8_AMAX_FLOOR = struct.unpack("f", struct.pack("f", 1e-4))[0]  # a zero block's scale floor

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# The order of the integer list every op takes as ``plan``. Append only: the C++ header
# is generated from this tuple.
PLAN_FIELDS = (
    "rank",
    "world_size",
    "num_experts",
    "num_topk",
    "hidden",
    "row_bytes",  # bytes of one row of the configured dtype (window pitch for that dtype)
    "capacity",  # rows of the throughput window on every rank
    "max_tokens_per_rank",
    "ll_max_tokens_per_rank",  # 0 when the low-latency windows are not allocated
    "timeout_ms",  # bound of every device-side wait
    "off_recv_x",
    "off_recv_scales",
    "off_recv_src",
    "off_recv_weights",
    "off_combine_x",
    "off_ll_recv_x",
    "off_ll_recv_scales",
    "off_ll_recv_src",
    "off_ll_recv_weights",
    "off_ll_combine_x",
    "off_ctrl",
    "workspace_bytes",
)

# Phase trace of the low-latency kernels (off unless ctrl.trace_on is set; the benchmark's
# --trace reads it): %globaltimer nanoseconds at each point, one row per call, the row of
# epoch e at e % TRACE_CALLS. Dispatch and combine points are stamped by thread 0 of block 0.
TRACE_CALLS = 16
TRACE_POINTS = (
    "dispatch_start",        # kernel entry
    "dispatch_counted",      # this rank's pairs counted per expert
    "dispatch_published",    # tagged counts stored into every peer
    "dispatch_ranked",       # rows of this block's pairs known (lower ranks' counts read)
    "dispatch_first_loaded",     # warp 0's first chunk of x is in shared memory
    "dispatch_first_quantized",  # ... and quantized (quantize_fp8 only)
    "dispatch_sent",         # every store of block 0 is complete
    "dispatch_signalled",    # block 0's arrival added on every peer
    "dispatch_arrived",      # every block of every peer arrived here
    "dispatch_end",          # recv_counts written
    "combine_start",
    "combine_released",      # combine flags released into every peer (block 0)
    "combine_arrived",       # every owner's flag arrived
    "combine_end",           # warp 0 of block 0 reduced and wrote its items
)

# Control state inside the ctrl region: (name, element bytes, element count as a function
# of (world_size, num_experts)). Flags hold epochs (monotonic call counters), so they never
# need resetting. Counts are double-buffered by epoch parity.
CTRL_FIELDS = (
    ("counts", 4, lambda w, e: 2 * w * e),  # int32 [2][W][E]: per-source per-expert row counts
    ("count_flags", 8, lambda w, e: w),  # int64 [W]: source s published its counts for epoch
    ("data_flags", 8, lambda w, e: w),  # int64 [W]: source s finished writing its rows
    ("combine_flags", 8, lambda w, e: w),  # int64 [W]: owner d's expert outputs are ready
    # int64 [2][W][E + 1]: low-latency counts of source s, each stored with its epoch as a tag
    # (epoch << 32 | count), so the value is its own flag; entry E: the source's grid size.
    ("ll_counts", 8, lambda w, e: 2 * w * (e + 1)),
    ("ll_arrivals", 8, lambda w, e: w),  # int64 [W]: blocks of source s done writing here, ever
    ("ll_expected", 8, lambda w, e: w),  # int64 [W]: of those, how many this rank has awaited
    ("ll_combine_flags", 8, lambda w, e: w),
    ("epoch", 8, lambda w, e: 4),  # int64 [4]: throughput epoch, low-latency epoch, spare
    ("blocks_done", 4, lambda w, e: 8),  # int32 [8]: grid completion counters
    ("status", 8, lambda w, e: 4),  # int64 [4]: code, arg0, arg1, arg2 (see STATUS_*)
    ("host_status_ptr", 8, lambda w, e: 1),  # int64: host-mapped mirror of status, or 0
    ("trace_on", 8, lambda w, e: 1),  # int64: non-zero = low-latency kernels stamp TRACE_POINTS
    ("trace", 8, lambda w, e: TRACE_CALLS * len(TRACE_POINTS)),  # int64 [TRACE_CALLS][points]
)

# Absolute byte offsets of every control field are part of the plan too, so the CUDA side
# reads them instead of recomputing this layout.
PLAN_FIELDS = PLAN_FIELDS + tuple(f"off_ctrl_{name}" for name, _, _ in CTRL_FIELDS)
PLAN_INDEX = {name: i for i, name in enumerate(PLAN_FIELDS)}

# Status codes a kernel leaves in ctrl.status (and its host mirror); arguments in brackets.
STATUS_OK = 0
STATUS_CAPACITY = 1  # [rank whose window overflows, rows needed, capacity]
STATUS_TIMEOUT = 2  # [rank waited for, what (WAIT_*), epoch]
STATUS_BAD_INDEX = 3  # [token, topk slot, value]
WAIT_COUNTS, WAIT_DATA, WAIT_COMBINE, WAIT_LL_COUNTS, WAIT_LL_DATA, WAIT_LL_COMBINE = range(6)
WAIT_NAMES = (
    "dispatch counts",
    "dispatch data",
    "combine readiness",
    "low-latency counts",
    "low-latency data",
    "low-latency combine readiness",
)


def _align(n: int) -> int:
    return (n + REGION_ALIGN - 1) // REGION_ALIGN * REGION_ALIGN


def ctrl_offsets(world_size: int, num_experts: int) -> tuple[dict[str, int], int]:
    """Byte offsets of CTRL_FIELDS inside the ctrl region, and the region's size."""
    offsets, pos = {}, 0
    for name, elem_bytes, count in CTRL_FIELDS:
        pos = (pos + 7) // 8 * 8
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
    capacity: rows of each rank's throughput window. ``None``: the worst case,
        ``world_size * T * min(K, E / world_size)``. A smaller value saves memory; a call whose
        routing needs more rows raises (nothing is written past the window).
    ll_max_tokens_per_rank: tokens per rank of the low-latency (decode) windows; 0 = none.
    num_sms: SMs the communication kernels may use (the rest stays with the GEMMs).
    timeout_s: bound of every wait for another rank, host or device.
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

    @property
    def scale_cols(self) -> int:
        """FP8 scales per row (0 when hidden is not a multiple of FP8_BLOCK)."""
        return self.hidden // FP8_BLOCK if self.hidden % FP8_BLOCK == 0 else 0


def check_world(config: CommConfig, world_size: int) -> None:
    if not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
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
        sizes = (
            ("off_recv_x", capacity * row_bytes),
            ("off_recv_scales", capacity * scale_bytes),
            ("off_recv_src", capacity * 8),
            ("off_recv_weights", capacity * 4),
            ("off_combine_x", capacity * row_bytes),
            ("off_ll_recv_x", ll_rows * row_bytes),
            ("off_ll_recv_scales", ll_rows * scale_bytes),
            ("off_ll_recv_src", ll_rows * 8),
            ("off_ll_recv_weights", ll_rows * 4),
            ("off_ll_combine_x", ll_rows * row_bytes),
        )
        offsets, pos = {}, 0
        for name, nbytes in sizes:
            offsets[name] = pos
            pos = _align(pos + nbytes)
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
            workspace_bytes=self.workspace_bytes,
            **self.offsets,
            **{f"off_ctrl_{k}": self.offsets["off_ctrl"] + v for k, v in self.ctrl.items()},
        )
        return [values[name] for name in PLAN_FIELDS]


def plan_value(plan: list[int], name: str) -> int:
    """Read one field of an ``int[] plan`` argument."""
    return plan[PLAN_INDEX[name]]


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


def emit_header() -> str:
    lines = [
        "// Generated by `python -m torch_swiftep.plan --emit-header`; do not edit.",
        "// Indices into the `int[] plan` every swiftep op takes, and byte offsets of the",
        "// control fields inside the ctrl region (torch_swiftep/plan.py is the source).",
        "#pragma once",
        "#include <cstdint>",
        "",
        "namespace swiftep {",
        "",
        "enum PlanField : int {",
    ]
    lines += [f"  kPlan_{name} = {i}," for i, name in enumerate(PLAN_FIELDS)]
    lines += [f"  kPlanNumFields = {len(PLAN_FIELDS)},", "};", ""]
    lines += [
        "enum StatusCode : int64_t {",
        f"  kStatusOk = {STATUS_OK},",
        f"  kStatusCapacity = {STATUS_CAPACITY},",
        f"  kStatusTimeout = {STATUS_TIMEOUT},",
        f"  kStatusBadIndex = {STATUS_BAD_INDEX},",
        "};",
        "",
        "enum WaitWhat : int64_t {",
    ]
    fp8 = [
        "// FP8 recipe (plan.py FP8_*).",
        f"constexpr int kFp8Block = {FP8_BLOCK};",
        f"constexpr float kFp8Max = {FP8_MAX.hex()}f;  // {FP8_MAX}",
        f"constexpr float kFp8ScalePerAmax = {FP8_SCALE_PER_AMAX.hex()}f;  // float32(1 / 448)",
        f"constexpr float kFp8AmaxFloor = {FP8_AMAX_FLOOR.hex()}f;  // float32(1e-4)",
        "",
    ]
    for i, name in enumerate(
        ("Counts", "Data", "Combine", "LlCounts", "LlData", "LlCombine")
    ):
        lines.append(f"  kWait{name} = {i},")
    trace = ["// Low-latency phase trace (plan.py TRACE_*).",
             f"constexpr int kTraceCalls = {TRACE_CALLS};",
             f"constexpr int kTracePoints = {len(TRACE_POINTS)};",
             "enum TracePoint : int {"]
    trace += [f"  kTrace_{name} = {i}," for i, name in enumerate(TRACE_POINTS)]
    trace += ["};", ""]
    lines += ["};", ""] + fp8 + trace + ["}  // namespace swiftep", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emit-header", action="store_true", help="print plan_fields.h")
    args = parser.parse_args()
    if args.emit_header:
        print(emit_header(), end="")


if __name__ == "__main__":
    main()
