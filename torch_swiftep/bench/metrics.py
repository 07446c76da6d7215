"""Byte counts and table formatting shared by the CPU and GPU benchmarks (docs/design.md's
measuring rules: DeepEP's algorithm-bandwidth convention, plus the bytes really moved)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import FP8_BLOCK


@dataclass
class RoutingBytes:
    """Bytes of one rank's call, from its routing. row_bytes = hidden * element size."""

    token_rank_pairs: int  # (token, destination rank) pairs: DeepEP's algorithm-bandwidth unit
    rows: int  # valid (token, slot) pairs: rows written by dispatch / read by combine
    tokens_sent: int  # tokens with at least one valid expert
    num_tokens: int
    remote_rows: int = 0  # rows on other ranks (of() with the source rank): over the link
    remote_pairs: int = 0  # (token, rank) pairs with another rank: dispatch_fanout's link rows

    @staticmethod
    def of(topk_idx: torch.Tensor, num_experts: int, world_size: int,
           rank: int | None = None) -> "RoutingBytes":
        idx = topk_idx.long().cpu()
        valid = idx >= 0
        local = num_experts // world_size
        owner = torch.where(valid, idx // local, world_size)
        in_rank = torch.zeros(idx.size(0), world_size + 1, dtype=torch.bool)
        in_rank.scatter_(1, owner, True)
        in_rank = in_rank[:, :world_size]
        remote = (0, 0) if rank is None else (
            int((valid & (owner != rank)).sum()),
            int(in_rank.sum()) - int(in_rank[:, rank].sum()))
        return RoutingBytes(int(in_rank.sum()), int(valid.sum()), int(valid.any(1).sum()),
                            idx.size(0), *remote)


def dispatch_min_bytes(r: RoutingBytes, row_bytes: int, read_row_bytes: int | None = None) -> int:
    """Least HBM traffic of a zero-copy dispatch: read each sent token once (read_row_bytes,
    default row_bytes), write each row (row_bytes, with its scales when quantizing)."""
    read = row_bytes if read_row_bytes is None else read_row_bytes
    return r.tokens_sent * read + r.rows * row_bytes


def fp8_row_bytes(hidden: int) -> int:
    """Bytes of one FP8 row with its float32 scales (one per 128 channels)."""
    return hidden + hidden // FP8_BLOCK * 4


def combine_min_bytes(r: RoutingBytes, row_bytes: int) -> int:
    """Least HBM traffic of a combine: read each row once, write each token's output once."""
    return (r.rows + r.num_tokens) * row_bytes


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
