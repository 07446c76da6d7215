from ._checks import check_combine, combine_shape_facts
from ._common import COMM_ARGS, COMM_DOC
from ._contract import OpContract

SCHEMA = f"""low_latency_combine(
    Tensor expert_out,
    Tensor topk_idx,
    Tensor topk_weights,
    Tensor token_rows,
    Tensor recv_counts,
    {COMM_ARGS}
) -> Tensor"""

DOC = f"""Low-latency combine, weighted, float32 accumulation.

expert_out: [num_local_experts, world_size * ll_max_tokens_per_rank, hidden], bf16/fp16/fp32;
  no copy when it is the workspace's ll_combine_x region
  (Communicator.low_latency_combine_buffer()).
topk_idx, topk_weights: the routing of the matching low_latency_dispatch.
token_rows: [num_tokens, num_topk], int32, from low_latency_dispatch.
recv_counts: [num_local_experts], int32, from low_latency_dispatch.
{COMM_DOC}
Returns y: [num_tokens, hidden], expert_out's dtype.
"""


def check(expert_out, topk_idx, topk_weights, token_rows, recv_counts, workspace, peer_ptrs,
          group_name, plan, num_sms):
    check_combine(expert_out, topk_idx, topk_weights, token_rows, recv_counts, workspace, plan,
                  num_sms, low_latency=True)


def fake(expert_out, topk_idx, topk_weights, token_rows, recv_counts, workspace, peer_ptrs,
         group_name, plan, num_sms):
    combine_shape_facts(expert_out, topk_idx, topk_weights, token_rows, plan)
    return expert_out.new_empty([topk_idx.size(0), expert_out.size(-1)])


CONTRACT = OpContract("low_latency_combine", SCHEMA, DOC, check, fake)
