from ._checks import check_combine, combine_shape_facts
from ._common import COMM_ARGS, COMM_DOC
from ._contract import OpContract

# The throughput combines' routing arguments (combine, combine_symmetric) and their doc.
ROUTING_ARGS = """Tensor topk_idx,
    Tensor topk_weights,
    Tensor token_rows,
    Tensor expert_offsets,"""
ROUTING_DOC = """topk_idx: [num_tokens, num_topk], the same routing as the dispatch.
topk_weights: [num_tokens, num_topk], float32.
token_rows: [num_tokens, num_topk], int32, from the dispatch.
expert_offsets: [num_local_experts + 1], int32, from the dispatch."""

SCHEMA = f"""combine(
    Tensor expert_out,
    {ROUTING_ARGS}
    {COMM_ARGS}
) -> Tensor"""

DOC = f"""Throughput combine: y[n] = sum_k topk_weights[n, k] * expert_out_owner[token_rows[n, k]],
accumulated in float32, written in expert_out's dtype; a token with no valid expert gets zeros.

expert_out: [capacity or more, hidden], bf16/fp16/fp32: this rank's expert outputs, row i
  belonging to dispatch row i. When it is the workspace's combine_x region (what
  Communicator.combine_buffer() returns) no copy is made; otherwise it is first copied there.
{ROUTING_DOC}
{COMM_DOC}
Returns y: [num_tokens, hidden], expert_out's dtype.
"""


def check(expert_out, topk_idx, topk_weights, token_rows, expert_offsets, workspace, peer_ptrs,
          group_name, plan, num_sms):
    check_combine(expert_out, topk_idx, topk_weights, token_rows, expert_offsets, workspace, plan,
                  num_sms, low_latency=False)


def fake(expert_out, topk_idx, topk_weights, token_rows, expert_offsets, workspace, peer_ptrs,
         group_name, plan, num_sms):
    combine_shape_facts(expert_out, topk_idx, topk_weights, token_rows, plan)
    return expert_out.new_empty([topk_idx.size(0), expert_out.size(-1)])


CONTRACT = OpContract("combine", SCHEMA, DOC, check, fake)
