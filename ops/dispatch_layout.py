import torch

from ._checks import check_tensor
from ._contract import OpContract
from .protocol import INDEX_DTYPES

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


def check(topk_idx, num_experts, world_size):
    check_tensor("topk_idx", topk_idx, dim=2, dtypes=INDEX_DTYPES)
    for name, value in (("num_experts", num_experts), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_experts % world_size != 0:
        raise ValueError(f"num_experts={num_experts} is not divisible by world_size={world_size}")


def fake(topk_idx, num_experts, world_size):
    torch._check(topk_idx.dim() == 2, lambda: "topk_idx must be 2-D")
    n = topk_idx.size(0)
    return (
        topk_idx.new_empty([world_size], dtype=torch.int32),
        topk_idx.new_empty([num_experts], dtype=torch.int32),
        topk_idx.new_empty([n, world_size], dtype=torch.bool),
    )


CONTRACT = OpContract("dispatch_layout", SCHEMA, DOC, check, fake)
