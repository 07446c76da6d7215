import torch

from ._checks import check_combine, check_tensor, combine_shape_facts
from ._common import COMM_ARGS, COMM_DOC
from ._contract import OpContract
from .combine import ROUTING_ARGS, ROUTING_DOC
from .protocol import plan_value

SCHEMA = f"""combine_symmetric(
    Tensor expert_out,
    Tensor row_bases,
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
row_bases: [world_size], int64, on the workspace's device: row_bases[r] is the address, as
  mapped in this process, of row 0 of rank r's expert_out (the rendezvous handle's
  buffer_ptrs). The CPU backend ignores it (zeros): its result is exactly combine's.
{ROUTING_DOC}
{COMM_DOC}
Returns y: [num_tokens, hidden], expert_out's dtype.
"""

VECTOR_BYTES = 16  # what one load of the CUDA kernel reads


def check_row_bases(row_bases, workspace, plan) -> None:
    check_tensor("row_bases", row_bases, dim=1, dtypes=(torch.int64,), device=workspace.device)
    world = plan_value(plan, "world_size")
    if row_bases.numel() != world:
        raise ValueError(f"row_bases has {row_bases.numel()} entries (shape "
                         f"{tuple(row_bases.shape)}), must be world_size={world}: one row-0 "
                         "address per rank")


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


def check(expert_out, row_bases, topk_idx, topk_weights, token_rows, expert_offsets, workspace,
          peer_ptrs, group_name, plan, num_sms):
    check_combine(expert_out, topk_idx, topk_weights, token_rows, expert_offsets, workspace, plan,
                  num_sms, low_latency=False)
    check_row_bases(row_bases, workspace, plan)
    _check_alignment(expert_out)


def fake(expert_out, row_bases, topk_idx, topk_weights, token_rows, expert_offsets, workspace,
         peer_ptrs, group_name, plan, num_sms):
    combine_shape_facts(expert_out, topk_idx, topk_weights, token_rows, plan)
    return expert_out.new_empty([topk_idx.size(0), expert_out.size(-1)])


CONTRACT = OpContract("combine_symmetric", SCHEMA, DOC, check, fake)
