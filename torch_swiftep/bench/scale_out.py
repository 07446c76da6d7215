"""python3 -m torch_swiftep.bench.scale_out: what crosses node boundaries in one dispatch.

For a world of nodes (ranks_per_node ranks each) and the standard routing, counts the rows that
leave a node: hierarchical (one per (token, destination node), what the throughput schedule
sends across nodes) against flat (one per (token, destination rank)), with the bytes per rank
and the rows per node pair. Arithmetic on the routing only: on one GPU a cross-node time would
mean nothing, so none is printed.
"""
from __future__ import annotations

import argparse

import torch

from .. import testing
from ..backends.cpu_hierarchical import cross_node_rows


def report(world: int, per_node: int, tokens: int, hidden: int, topk: int, experts: int,
           routing: str = "uniform", seed: int = 0) -> dict:
    case = testing.Case(seed, torch.bfloat16, hidden, topk, routing, experts, (tokens,) * world)
    inputs = case.inputs()
    counts = cross_node_rows(inputs.topk_idx, experts, per_node)
    row_bytes = hidden * 2
    return dict(world=world, ranks_per_node=per_node, tokens=tokens, **counts,
                hierarchical_mb_per_rank=counts["hierarchical_rows"] * row_bytes / world / 1e6,
                flat_mb_per_rank=counts["flat_rows"] * row_bytes / world / 1e6)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m torch_swiftep.bench.scale_out",
                                description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (default: 4096)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--worlds", default="16:8,32:8",
                   help="world:ranks_per_node pairs (default: 16:8,32:8, i.e. EP16 and EP32 "
                        "over nodes of 8 GPUs)")
    args = p.parse_args(argv)
    for item in args.worlds.split(","):
        world, per_node = (int(v) for v in item.split(":"))
        r = report(world, per_node, args.tokens, args.hidden, args.topk, args.experts)
        ratio = r["flat_rows"] / max(r["hierarchical_rows"], 1)
        print(f"EP{world} ({world // per_node} nodes of {per_node}), {args.tokens} tokens/rank, "
              f"top-{args.topk} of {args.experts}, uniform: rows leaving their node per rank "
              f"{r['hierarchical_rows'] / world:.0f} hierarchical vs {r['flat_rows'] / world:.0f} "
              f"flat ({ratio:.2f}x fewer); {r['hierarchical_mb_per_rank']:.1f} vs "
              f"{r['flat_mb_per_rank']:.1f} MB per rank (bf16)")
        pairs = r["rows_per_node_pair"]
        print("  rows per (source node, destination node): " +
              ", ".join(f"{a}->{b}: {n}" for (a, b), n in sorted(pairs.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
