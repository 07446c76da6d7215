import torch

from ._checks import check_dispatch, dispatch_shape_facts
from ._common import COMM_ARGS, COMM_DOC, QUANTIZE_DOC
from ._contract import OpContract
from .protocol import num_local_experts

SCHEMA = f"""low_latency_dispatch(
    Tensor x,
    Tensor? x_scales,
    Tensor topk_idx,
    Tensor topk_weights,
    {COMM_ARGS},
    bool quantize_fp8=False
) -> (Tensor recv_counts, Tensor token_rows)"""

DOC = f"""Low-latency (decode) dispatch with static shapes: counting and sending in one pass.

x: [num_tokens, hidden] (num_tokens <= ll_max_tokens_per_rank), bf16/fp16/fp32, or
  float8_e4m3fn with x_scales [num_tokens, hidden / 128] float32.
topk_idx: [num_tokens, num_topk], int64 or int32, -1 = no expert.
topk_weights: [num_tokens, num_topk], float32.
{COMM_DOC}
{QUANTIZE_DOC}
Writes, on every owner rank, the workspace regions ll_recv_x [num_local_experts,
world_size * ll_max_tokens_per_rank, hidden], ll_recv_scales, ll_recv_src and ll_recv_weights:
expert j's rows are packed in [0, recv_counts[j]) in (source rank, source token, topk slot)
order.
Returns:
  recv_counts: [num_local_experts], int32, device-resident.
  token_rows: [num_tokens, num_topk], int32: flat row (j * world_size * ll_max_tokens_per_rank
    + slot) on the owner rank, -1 for no expert.
"""


def check(x, x_scales, topk_idx, topk_weights, workspace, peer_ptrs, group_name, plan, num_sms,
          quantize_fp8=False):
    check_dispatch(x, x_scales, topk_idx, topk_weights, workspace, plan, num_sms, quantize_fp8,
                   low_latency=True)


def fake(x, x_scales, topk_idx, topk_weights, workspace, peer_ptrs, group_name, plan, num_sms,
         quantize_fp8=False):
    dispatch_shape_facts(x, x_scales, topk_idx, topk_weights, plan)
    return (
        x.new_empty([num_local_experts(plan)], dtype=torch.int32),
        x.new_empty(list(topk_idx.shape), dtype=torch.int32),
    )


CONTRACT = OpContract("low_latency_dispatch", SCHEMA, DOC, check, fake)
