import torch

from ._checks import check_combine, check_tensor, combine_shape_facts
from ._common import COMM_ARGS, COMM_DOC
from ._contract import OpContract
from .combine import ROUTING_ARGS, ROUTING_DOC
from .protocol import plan_value

SCHEMA = f"""combine_symmetric(
    Tensor expert_out,
    Tensor segment_bases,
    int segment,
    int segment_offset,
    {ROUTING_ARGS}
    {COMM_ARGS}
) -> Tensor"""

DOC = f"""Throughput combine that reads every owner's expert outputs where they are (no staging
copy): the result is combine's, y[n] = sum_k topk_weights[n, k] *
expert_out_owner[token_rows[n, k]], accumulated in float32, written in expert_out's dtype; a
token with no valid expert gets zeros. The flags and epochs are combine's.

expert_out: [capacity or more, hidden], bf16/fp16/fp32, contiguous: this rank's expert outputs,
  row i belonging to dispatch row i, allocated from torch's symmetric memory pool
  (Communicator.expert_output_pool()) so that every peer can read it. CUDA: its data_ptr and
  its row bytes (hidden * element size) must be multiples of 16, the kernel reading 16-byte
  vectors (else ValueError naming expert_out and the value).
segment_bases: [segments, world_size], int64, contiguous, on the workspace's device: one row
  per expert_out segment rendezvoused over the group (torch's symmetric memory), entry r the
  address, as mapped in this process, of rank r's segment (0 where unknown).
segment, segment_offset: this rank's expert_out starts segment_offset bytes (a multiple of 16)
  into its own segment `segment` of segment_bases. Each rank publishes its pair before its
  combine flags, so peers find its rows whichever segment its pool picked; a published segment
  not in a reader's table is a SwiftepError on that reader (status bad_segment). segment -1:
  expert_out is in no segment the peers know; its valid rows are staged into this rank's
  combine window (combine's copy) and the peers read them there. The CPU backend checks but
  ignores these (its result is exactly combine's).
{ROUTING_DOC}
{COMM_DOC}
Returns y: [num_tokens, hidden], expert_out's dtype.
"""

VECTOR_BYTES = 16  # what one load of the CUDA kernel reads
STAGED_SEGMENT = -1  # expert_out is in no segment the peers know: staged (kStagedSegment)


def check_segment_table(segment_bases, segment, segment_offset, workspace, plan) -> None:
    check_tensor("segment_bases", segment_bases, dim=2, dtypes=(torch.int64,),
                 device=workspace.device)
    world = plan_value(plan, "world_size")
    if segment_bases.size(1) != world:
        raise ValueError(f"segment_bases has shape {tuple(segment_bases.shape)}, must be "
                         f"[segments, world_size={world}]: one address per rank and segment")
    for name, value in (("segment", segment), ("segment_offset", segment_offset)):
        if isinstance(value, torch.SymInt):  # traced: the values are checked when it runs
            return
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if segment != STAGED_SEGMENT and not 0 <= segment < segment_bases.size(0):
        raise ValueError(f"segment must be {STAGED_SEGMENT} or in [0, {segment_bases.size(0)}) "
                         f"(segment_bases' rows), got {segment}")
    if segment_offset < 0 or segment_offset % VECTOR_BYTES != 0:
        raise ValueError(f"segment_offset must be a non-negative multiple of {VECTOR_BYTES}, "
                         f"got {segment_offset}")


def _check_alignment(expert_out) -> None:
    """CUDA: the kernel reads 16-byte vectors of every row."""
    if not expert_out.is_cuda:
        return
    row_bytes = expert_out.size(-1) * expert_out.element_size()
    if row_bytes % VECTOR_BYTES != 0:
        raise ValueError(f"expert_out has rows of {row_bytes} bytes (shape "
                         f"{tuple(expert_out.shape)}, {expert_out.dtype}); combine_symmetric "
                         f"needs a multiple of {VECTOR_BYTES}")
    if torch.compiler.is_compiling():  # traced: no address to check
        return
    if expert_out.data_ptr() % VECTOR_BYTES != 0:
        raise ValueError(f"expert_out starts at {expert_out.data_ptr():#x}, not a multiple of "
                         f"{VECTOR_BYTES} bytes")


def check(expert_out, segment_bases, segment, segment_offset, topk_idx, topk_weights,
          token_rows, expert_offsets, workspace, peer_ptrs, group_name, plan, num_sms):
    check_combine(expert_out, topk_idx, topk_weights, token_rows, expert_offsets, workspace, plan,
                  num_sms, low_latency=False)
    check_segment_table(segment_bases, segment, segment_offset, workspace, plan)
    _check_alignment(expert_out)


def fake(expert_out, segment_bases, segment, segment_offset, topk_idx, topk_weights,
         token_rows, expert_offsets, workspace, peer_ptrs, group_name, plan, num_sms):
    combine_shape_facts(expert_out, topk_idx, topk_weights, token_rows, plan)
    return expert_out.new_empty([topk_idx.size(0), expert_out.size(-1)])


CONTRACT = OpContract("combine_symmetric", SCHEMA, DOC, check, fake)
