import torch

from ._contract import OpContract

SCHEMA = """dispatch_layout(
    Tensor topk_idx,
    int num_experts,
    int world_size
) -> (Tensor num_tokens_per_rank, Tensor num_tokens_per_expert, Tensor is_token_in_rank)"""

DOC = """Counts of one rank's routing; local, no communication.

topk_idx: [num_tokens, num_topk], int64 or int32, -1 = no expert, else in [0, num_experts).
Returns:
  num_tokens_per_rank: [world_size], int32: tokens with at least one expert on each rank.
  num_tokens_per_expert: [num_experts], int32: (token, topk slot) pairs per expert.
  is_token_in_rank: [num_tokens, world_size], bool.
"""


def fake(topk_idx, num_experts, world_size):
    n = topk_idx.size(0)
    return (
        topk_idx.new_empty([world_size], dtype=torch.int32),
        topk_idx.new_empty([num_experts], dtype=torch.int32),
        topk_idx.new_empty([n, world_size], dtype=torch.bool),
    )


CONTRACT = OpContract("dispatch_layout", SCHEMA, DOC, fake)
