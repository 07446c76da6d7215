import torch

from ._checks import check_dispatch, dispatch_shape_facts
from ._common import COMM_ARGS, COMM_DOC, QUANTIZE_DOC
from ._contract import OpContract
from .protocol import num_local_experts

SCHEMA = f"""dispatch(
    Tensor x,
    Tensor? x_scales,
    Tensor topk_idx,
    Tensor topk_weights,
    {COMM_ARGS},
    bool quantize_fp8=False
) -> (Tensor expert_offsets, Tensor token_rows)"""

DOC = f"""Throughput (prefill) dispatch: every (token, topk slot) with a valid expert becomes one
row of the owner rank's expert window, written in place (zero copy).

x: [num_tokens, hidden], bf16/fp16/fp32, or float8_e4m3fn with x_scales.
x_scales: [num_tokens, hidden / 128], float32, only with an FP8 x (one scale per 128 channels).
topk_idx: [num_tokens, num_topk], int64 or int32, -1 = no expert.
topk_weights: [num_tokens, num_topk], float32.
{COMM_DOC}
{QUANTIZE_DOC}
Writes, on every owner rank, rows [0, expert_offsets[-1]) of the workspace regions recv_x
[capacity, hidden] (x's dtype), recv_scales [capacity, hidden / 128] (FP8 only), recv_src
[capacity, 2] int32 (source rank, source token) and recv_weights [capacity] float32. Rows of
local expert j are [expert_offsets[j], expert_offsets[j + 1]), ordered by (source rank, source
token, topk slot): a pure function of the routing.
Returns:
  expert_offsets: [num_local_experts + 1], int32, device-resident; expert_offsets[1:] is the
    `offs` of torch._grouped_mm.
  token_rows: [num_tokens, num_topk], int32: the row each (token, slot) landed in on its owner
    rank, -1 for no expert. It is what combine needs.
"""


def check(x, x_scales, topk_idx, topk_weights, workspace, peer_ptrs, group_name, plan, num_sms,
          quantize_fp8=False):
    check_dispatch(x, x_scales, topk_idx, topk_weights, workspace, plan, num_sms, quantize_fp8,
                   low_latency=False)


def fake(x, x_scales, topk_idx, topk_weights, workspace, peer_ptrs, group_name, plan, num_sms,
         quantize_fp8=False):
    dispatch_shape_facts(x, x_scales, topk_idx, topk_weights, plan)
    return (
        x.new_empty([num_local_experts(plan) + 1], dtype=torch.int32),
        x.new_empty(list(topk_idx.shape), dtype=torch.int32),
    )


CONTRACT = OpContract("dispatch", SCHEMA, DOC, check, fake)
