"""The host-device protocol: every number the Python side and the CUDA kernels must agree on.

Written once, here. ``csrc/include/swiftep/protocol.h`` is generated from this module
(``python -m torch_swiftep.codegen``; a test fails while it is stale), so the kernels, the
launchers and the binding read the same field indices, offsets, codes and limits.

What the protocol covers:
- the ``int[] plan`` every communication op takes: PLAN_FIELDS, in this order. The values are
  computed by ``torch_swiftep.plan.Plan`` (the workspace layout of one rank);
- the decoded form the kernels take (COMM_PARAMS -> ``struct CommParams``);
- the control fields inside the workspace's ctrl region (CTRL_FIELDS) and their slots;
- status codes, the names of every cross-rank wait, the FP8 recipe, the top-k limit and the
  low-latency phase-trace points.

Imports torch only (for dtypes): ops/ is a leaf that nothing in torch_swiftep is imported into.
"""
from __future__ import annotations

import struct

import torch

# Bulk copies and 16-byte vector accesses need 16-byte alignment; 128 also keeps every region on
# its own cache lines so flags never share a line with data.
REGION_ALIGN = 128
# Control fields are 8-byte aligned inside the ctrl region (64-bit flags and atomics).
CTRL_ALIGN = 8

# Activation dtypes of the windows; FP8 dispatch uses the same windows at one byte per element.
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int64, torch.int32)

# The CUDA kernels give one lane of a warp to each top-k slot.
MAX_TOPK = 32

# DeepSeek-V3 FP8 recipe: one float32 scale per token per 128 channels. With
# a = max(amax, FP8_AMAX_FLOOR): q = e4m3(x * (FP8_MAX / a)), scale = a * FP8_SCALE_PER_AMAX
# (x ~= q * scale). The CUDA dispatch that quantizes in-kernel does the same IEEE-rounded
# operations, so both give identical bytes. One division per block, not per element (the
# kernel's cost), and never a division by a Python scalar: torch on CUDA turns that into a
# product with the reciprocal and on CPU does not.
FP8_BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
FP8_SCALE_PER_AMAX = struct.unpack("f", struct.pack("f", 1.0 / FP8_MAX))[0]  # float32(1 / 448)
FP8_AMAX_FLOOR = struct.unpack("f", struct.pack("f", 1e-4))[0]  # a zero block's scale floor

# The scalar part of the plan, in order: (name, C type of its CommParams field, or None when
# the kernels do not take it, meaning).
SCALAR_FIELDS = (
    ("rank", "int32_t", "this rank"),
    ("world_size", "int32_t", "ranks in the group"),
    ("num_experts", "int32_t", "E, experts over all ranks"),
    ("num_topk", "int32_t", "K the communicator was built for (calls may use fewer)"),
    ("hidden", "int32_t", "channels of a token"),
    ("row_bytes", "int64_t", "bytes of one row of the configured dtype (window pitch)"),
    ("capacity", "int64_t", "rows of the throughput windows on every rank"),
    ("max_tokens_per_rank", "int32_t", "most tokens one throughput call sends"),
    ("ll_max_tokens_per_rank", "int32_t", "most tokens one low-latency call sends (0: none)"),
    ("timeout_ms", "int64_t", "bound of every wait for a peer"),
    # ranks of one node (NVLink domain); world_size when the world is one node. The CPU backend
    # forwards through nodes by it; the CUDA kernels do not take it yet (scale-out).
    ("ranks_per_node", None, "ranks of one node"),
    # 1: the throughput dispatch sends one copy of a token's row per remote rank, into the
    # lowest of its rows there, and each rank fans the copies out into the token's other rows
    # (docs/design.md, "NVLink bytes of expert-major rows")
    ("dispatch_fanout", "int32_t", "one row per (token, remote rank) crosses; fanned out"),
    # 1: the throughput combine reduces each (token, owner rank)'s slots on the owner, from
    # expert_out where it is, and sends that partial (rounded to expert_out's dtype) to the
    # token's rank, which sums the partials in rank order (reference.combine(ranks_per_node=1))
    ("combine_partials", "int32_t", "one partial per (token, owner rank) crosses"),
)

# Regions of a rank's workspace, in address order (sizes: torch_swiftep.plan.Plan.build).
REGIONS = (
    "recv_x",  # [capacity, hidden] x dtype: dispatch lands here (expert-major rows)
    "recv_scales",  # [capacity, hidden / 128] f32: FP8 scales of recv_x rows
    "recv_src",  # [capacity, 2] int32: (source rank, source token) of each row
    "recv_weights",  # [capacity] f32: the token's weight for this row's expert
    # [W * T] u64, dispatch_fanout only: per (source rank, token), epoch << 32 | ~lowest row
    "fanout_rows",
    # [W * T * K] u64, combine_partials only: per (source rank, token, slot) the slot's row
    # here, epoch << 32 | row, written by the source's dispatch with the row
    "pair_rows",
    # [W * T, hidden] x dtype, combine_partials only: the partial of (owner rank, token) at
    # owner * T + token, written by the owner's combine
    "partials",
    "combine_x",  # [capacity, hidden] x dtype: experts write outputs here; combine reads it
    "ll_recv_x",  # [L, W * T_ll, hidden]: low-latency dispatch window
    "ll_recv_scales",  # [L, W * T_ll, hidden / 128] f32
    "ll_recv_src",  # [L, W * T_ll, 2] int32
    "ll_recv_weights",  # [L, W * T_ll] f32
    "ll_combine_x",  # [L, W * T_ll, hidden]: low-latency expert outputs
)

# Phase trace of the low-latency kernels (off unless ctrl.trace_on is set; the benchmark's
# --trace reads it): %globaltimer nanoseconds at each point, one row per call, the row of
# epoch e at e % TRACE_CALLS. Dispatch and combine points are stamped by thread 0 of block 0.
TRACE_CALLS = 16
TRACE_POINTS = (
    "dispatch_start",  # kernel entry
    "dispatch_counted",  # this rank's pairs counted per expert
    "dispatch_published",  # tagged counts stored into every peer
    "dispatch_ranked",  # rows of this block's pairs known (lower ranks' counts read)
    "dispatch_first_loaded",  # warp 0's first chunk of x is in shared memory
    "dispatch_first_quantized",  # ... and quantized (quantize_fp8 only)
    "dispatch_sent",  # every store of block 0 is complete
    "dispatch_signalled",  # block 0's arrival added on every peer
    "dispatch_arrived",  # every block of every peer arrived here
    "dispatch_end",  # recv_counts written
    "combine_start",
    "combine_released",  # combine flags released into every peer (block 0)
    "combine_arrived",  # every owner's flag arrived
    "combine_end",  # warp 0 of block 0 reduced and wrote its items
)

# Slots of ctrl.epoch: each schedule counts its calls; flags carry these epochs.
EPOCH_SLOTS = ("throughput", "low_latency")
EPOCH_CAPACITY = 4  # int64 slots reserved
# Slots of ctrl.blocks_done: one grid-completion counter per kernel that uses the
# last-block-done pattern, so kernels of the two schedules never share a counter.
BLOCKS_DONE_SLOTS = ("dispatch_data", "combine_partials")
BLOCKS_DONE_CAPACITY = 8  # int32 counters reserved (room for more kernels)

# Status codes a kernel leaves in ctrl.status (and its host mirror): (name, argument names).
STATUS_CODES = (
    ("ok", ()),
    ("capacity", ("rank whose window overflows", "rows needed", "capacity")),
    ("timeout", ("rank waited for", "what (WAITS index)", "call epoch")),
    ("bad_index", ("token", "topk slot", "value")),
    # a peer announced (ctrl.abort) that it failed this or an earlier call: waits give up at once
    ("peer_failed", ("rank that failed", "what (WAITS index)", "call epoch")),
    # combine_symmetric: a peer published a segment this rank's table does not hold
    ("bad_segment", ("rank whose expert_out", "segment it published", "segments in the table")),
)
STATUS = {name: code for code, (name, _) in enumerate(STATUS_CODES)}
STATUS_WORDS = 4  # code + 3 arguments

# Every cross-rank wait, by what it waits for: (name, what a timeout message calls it).
WAITS = (
    ("counts", "dispatch counts"),
    ("data", "dispatch data"),
    ("combine", "combine readiness"),
    ("ll_counts", "low-latency counts"),
    ("ll_data", "low-latency data"),
    ("ll_combine", "low-latency combine readiness"),
)
WAIT_NAMES = tuple(text for _, text in WAITS)

# Control state inside the ctrl region: (name, element bytes, element count as a function of
# (world_size, num_experts)). Flags hold epochs (monotonic call counters), so they never need
# resetting. Counts are double-buffered by epoch parity.
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
    ("ll_combine_flags", 8, lambda w, e: w),  # int64 [W]: owner d's LL outputs are ready
    ("epoch", 8, lambda w, e: EPOCH_CAPACITY),  # int64: calls per schedule (EPOCH_SLOTS)
    ("blocks_done", 4, lambda w, e: BLOCKS_DONE_CAPACITY),  # int32: grid completion counters
    ("status", 8, lambda w, e: STATUS_WORDS),  # int64: code, arg0, arg1, arg2 (STATUS_CODES)
    ("host_status_ptr", 8, lambda w, e: 1),  # int64: host-mapped mirror of status, or 0
    # int64: 0, or 1 + the rank that failed a call (rejected its inputs): written by that rank's
    # host into every peer's workspace, never reset (the communicator must be rebuilt), so
    # every wait of every later kernel gives up at once instead of waiting out timeout_s
    ("abort", 8, lambda w, e: 1),
    # int64 [2]: (segment, byte offset) of this rank's expert_out in its current
    # combine_symmetric, stored before its combine flags are released; the peers read it to
    # find its rows in their segment tables (the pool's choice of segment is rank-local)
    ("combine_segment", 8, lambda w, e: 2),
    ("trace_on", 8, lambda w, e: 1),  # int64: non-zero = low-latency kernels stamp TRACE_POINTS
    ("trace", 8, lambda w, e: TRACE_CALLS * len(TRACE_POINTS)),  # int64 [TRACE_CALLS][points]
)

# The integer list every communication op takes as ``plan``: the scalars, the byte offset of
# every region and of the ctrl region, the workspace size, and the absolute byte offset of
# every control field (so the CUDA side reads them instead of recomputing the layout).
PLAN_FIELDS = (
    tuple(name for name, _, _ in SCALAR_FIELDS)
    + tuple(f"off_{region}" for region in REGIONS)
    + ("off_ctrl", "workspace_bytes")
    + tuple(f"off_ctrl_{name}" for name, _, _ in CTRL_FIELDS)
)
PLAN_INDEX = {name: i for i, name in enumerate(PLAN_FIELDS)}


def plan_value(plan, name: str) -> int:
    """One field of an ``int[] plan`` argument."""
    return plan[PLAN_INDEX[name]]


def num_local_experts(plan) -> int:
    return plan_value(plan, "num_experts") // plan_value(plan, "world_size")


def ll_rows_per_expert(plan) -> int:
    """S: rows of one local expert's low-latency window (world_size * ll_max_tokens_per_rank)."""
    return plan_value(plan, "world_size") * plan_value(plan, "ll_max_tokens_per_rank")


# The decoded plan the kernels take (struct CommParams, after the workspace and peer-table
# pointers): (C type, field, C expression over the plan's fields `p[...]`, meaning). Every
# offset is a byte offset from a workspace base; every rank's workspace has the same layout, so
# peer_base + offset addresses a peer's region.
_SCALAR_PARAMS = tuple((ctype, name, f"p[{name}]", meaning)
                       for name, ctype, meaning in SCALAR_FIELDS if ctype is not None)
_AFTER_NUM_EXPERTS = [name for _, name, _, _ in _SCALAR_PARAMS].index("num_experts") + 1
# num_local_experts sits right after num_experts: the kernels load both, and in one 8-byte word
# they are one constant load (the field order is part of what the kernels were measured with:
# docs/perf-notes.md, "Structure change").
COMM_PARAMS = (
    _SCALAR_PARAMS[:_AFTER_NUM_EXPERTS]
    + (("int32_t", "num_local_experts", "p[num_experts] / p[world_size]",
        "L = num_experts / world_size"),)
    + _SCALAR_PARAMS[_AFTER_NUM_EXPERTS:]
    + (("int64_t", "ll_rows_per_expert", "p[world_size] * p[ll_max_tokens_per_rank]",
        "S = world_size * ll_max_tokens_per_rank (0: no low-latency windows)"),)
    + tuple(("int64_t", f"off_{region}", f"p[off_{region}]", f"region {region}")
            for region in REGIONS)
    + tuple(("int64_t", f"off_{name}", f"p[off_ctrl_{name}]", f"ctrl field {name}")
            for name, _, _ in CTRL_FIELDS)
)
