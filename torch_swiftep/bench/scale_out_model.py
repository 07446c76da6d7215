"""A cost model of the hierarchical throughput schedule across nodes (docs/design.md,
"Scale-out"): predicted dispatch and combine time per rank at EP16 and EP32, with the SMs each
needs, before any cluster run exists.

    python3 -m torch_swiftep.bench.scale_out_model

Per rank, from the standard routing (every pair counted: who writes it, over which link):
  T = max(NIC bytes / NIC rate, NVLink bytes / NVLink rate, SM bytes / (s * per-SM rate)) + fixed
MEASURED: the per-SM rates (bytes of rows a communication SM moves per second: dispatch from the
1-SM point of docs/results/throughput.json, combine likewise) and the fixed cost (the low-latency
protocol time, docs/results). ASSUMED: the NIC (400 Gb/s line rate, 90% achievable) and NVLink
(370 GB/s per direction, H100/H200) rates, that the SM work scales with bytes (TMA copies), and
that links and SMs overlap fully.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import torch

from .. import testing

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "results" / "throughput.json"
FIXED_US = 5.0  # the low-latency protocol (0 tokens) measured ~5 us: launch plus flag round trips


def per_sm_rates(path: pathlib.Path = RESULTS) -> dict:
    """GB/s of rows one communication SM moves, from the 1-SM points of a measured run."""
    data = json.loads(path.read_text())
    rates = {}
    for r in data["records"]:
        if r["sms_per_rank"] == 1 and r["tokens"] == max(x["tokens"] for x in data["records"]):
            rates[r["op"]] = r["moved_gbps"]
    return rates


def link_loads(world: int, per_node: int, tokens: int, topk: int, experts: int,
               seed: int = 0) -> dict:
    """Per rank (the most loaded): rows sent over the NIC (one per (token, remote node)), pair
    rows written over NVLink, and rows its SMs write, for one dispatch of uniform routing."""
    case = testing.Case(seed, torch.bfloat16, 128, topk, "uniform", experts, (tokens,) * world)
    local = experts // world
    nic = torch.zeros(world)
    nvlink = torch.zeros(world)
    written = torch.zeros(world)
    for source, idx in enumerate(case.inputs().topk_idx):
        owners = (idx // local).flatten()
        owners = owners[idx.flatten() >= 0]
        same_node = owners // per_node == source // per_node
        writers = torch.where(same_node, torch.full_like(owners, source),
                              owners // per_node * per_node + source % per_node)
        written.index_add_(0, writers, torch.ones(owners.numel()))
        nvlink.index_add_(0, writers, (writers != owners).float())
        remote = torch.zeros(idx.size(0), world // per_node, dtype=torch.bool)
        nodes = torch.where(idx >= 0, idx // local // per_node, 0)
        remote.scatter_(1, nodes, idx >= 0)
        remote[:, source // per_node] = False
        nic[source] += remote.sum()
    return {"nic_rows": float(nic.max()), "nvlink_rows": float(nvlink.max()),
            "sm_rows": float((written + nic).max())}


def predict(world: int, per_node: int, tokens: int = 4096, hidden: int = 7168, topk: int = 8,
            experts: int = 256, nic_gbps: float = 45.0, nvlink_gbps: float = 370.0,
            rates: dict | None = None, fp8_dispatch: bool = True) -> dict:
    rates = rates or per_sm_rates()
    loads = link_loads(world, per_node, tokens, topk, experts)
    out = {}
    for op in ("dispatch", "combine"):
        row = hidden + hidden // 128 * 4 if op == "dispatch" and fp8_dispatch else hidden * 2
        nic_us = loads["nic_rows"] * row / nic_gbps / 1e3
        nvl_us = loads["nvlink_rows"] * row / nvlink_gbps / 1e3
        sm_bytes = loads["sm_rows"] * row
        link_us = max(nic_us, nvl_us)
        sms = next(s for s in range(1, 133) if sm_bytes / (s * rates[op]) / 1e3 <= link_us)
        time_us = link_us + FIXED_US
        out[op] = dict(time_us=time_us, sms=sms, nic_us=nic_us, nvlink_us=nvl_us,
                       rdma_gbps=loads["nic_rows"] * row / time_us / 1e3,
                       bound="NIC" if nic_us >= nvl_us else "NVLink")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m torch_swiftep.bench.scale_out_model",
                                description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--nic-gbps", type=float, default=45.0,
                   help="ASSUMED achievable NIC rate per GPU (default 45: 90%% of 400 Gb/s)")
    p.add_argument("--nvlink-gbps", type=float, default=370.0,
                   help="ASSUMED NVLink rate per direction per GPU (default 370)")
    args = p.parse_args(argv)
    rates = per_sm_rates()
    print(f"MEASURED per-SM row rates (docs/results/throughput.json, 1 SM/rank): "
          f"dispatch {rates['dispatch']:.0f} GB/s, combine {rates['combine']:.0f} GB/s; "
          f"ASSUMED NIC {args.nic_gbps:g} GB/s, NVLink {args.nvlink_gbps:g} GB/s")
    for world in (16, 32):
        result = predict(world, 8, args.tokens, nic_gbps=args.nic_gbps,
                         nvlink_gbps=args.nvlink_gbps, rates=rates)
        for op, r in result.items():
            dtype = "FP8" if op == "dispatch" else "bf16"
            print(f"EP{world} ({world // 8} nodes of 8) {op} ({dtype}): "
                  f"{r['time_us'] / 1e3:.2f} ms, {r['bound']}-bound, RDMA bottleneck bandwidth "
                  f"{r['rdma_gbps']:.0f} GB/s, needs {r['sms']} SMs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
