"""FP8 e4m3 with one float32 scale per token per 128 channels (the DeepSeek-V3 recipe)."""
from __future__ import annotations

import torch

from .ops.protocol import FP8_AMAX_FLOOR, FP8_BLOCK, FP8_DTYPE, FP8_MAX, FP8_SCALE_PER_AMAX

assert FP8_MAX == torch.finfo(FP8_DTYPE).max


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [num_tokens, hidden] (hidden % 128 == 0) -> (q [num_tokens, hidden] e4m3,
    scales [num_tokens, hidden / 128] float32) with x ~= q * scale per block."""
    if x.dim() != 2 or x.size(1) % FP8_BLOCK != 0:
        raise ValueError(
            f"x must be [num_tokens, hidden] with hidden % {FP8_BLOCK} == 0 for FP8, "
            f"got shape {tuple(x.shape)}"
        )
    n, h = x.shape
    blocks = x.float().view(n, h // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=-1).clamp(min=FP8_AMAX_FLOOR)
    # ops/protocol.py's recipe, op for op: the CUDA dispatch quantizes to the same bytes
    inverse = torch.full_like(amax, FP8_MAX) / amax  # tensor / tensor: IEEE on every device
    q = (blocks * inverse.unsqueeze(-1)).to(FP8_DTYPE).view(n, h)
    scales = amax * FP8_SCALE_PER_AMAX
    return q, scales.contiguous()


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    n, h = q.shape
    blocks = q.float().view(n, h // FP8_BLOCK, FP8_BLOCK) * scales.unsqueeze(-1)
    return blocks.view(n, h).to(dtype)
