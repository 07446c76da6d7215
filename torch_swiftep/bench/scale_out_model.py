"""A cost model of the hierarchical throughput schedule across nodes (docs/design.md,
"Scale-out"): predicted dispatch and combine time per rank at EP16 and EP32, with the SMs each
needs, before any cluster run exists.

    python3 -m torch_swiftep.bench.scale_out_model

Per rank, from the standard routing (every pair counted: who writes it, over which link):
  T = max(NIC bytes / NIC rate, NVLink bytes / NVLink rate, SM bytes / (s * per-SM rate)) + fixed
MEASURED (docs/results/multi_process_2gpu.json: 2 ranks on two H200s over NVLink, 4096
tokens/rank): the per-SM rates (bytes of rows a communication SM writes per second at the
smallest SM budget, where the SMs bound the op: the dispatch, and the combine of the experts'
pool tensor read in place), the NVLink rate (the rate of the peer's rows at the largest budget,
where the link bounds the op: what these kernels get from NV18, below the copy engine's 394
GB/s) and the fixed cost (the low-latency protocol time, docs/results). ASSUMED: the NIC (400
Gb/s line rate, 90% achievable), that one GPU's NVLink rate to 7 peers through NVSwitch is its
rate to one peer, that the SM work scales with bytes, and that links and SMs overlap fully.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import torch

from .. import testing

RESULTS = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "results"
           / "multi_process_2gpu.json")
COMBINE_OP = "combine, symmetric pool"  # the experts' own tensor, read in place
FIXED_US = 5.0  # the low-latency protocol (0 tokens) measured ~5 us: launch plus flag round trips


def measured_rates(path: pathlib.Path = RESULTS) -> dict:
    """{dispatch, combine: GB/s of rows per SM at the smallest budget; nvlink_dispatch,
    nvlink_combine: GB/s of the peer's rows at the largest} from a run with one GPU per rank
    (uniform routing: tokens x top-k rows per rank, (W - 1) / W of them from peers)."""
    data = json.loads(path.read_text())
    if data.get("ranks_per_gpu", data["world"]) != 1:
        raise ValueError(f"{path}: its ranks share a GPU; the rates need one GPU per rank")
    row_bytes = data["tokens"] * data["topk"] * data["hidden"] * 2  # a rank's rows
    peer_share = (data["world"] - 1) / data["world"]
    ms = {(r["op"], r["sms_per_rank"]): r["ms"] for r in data["records"]}
    low, high = min(data["sms_per_rank"]), max(data["sms_per_rank"])
    rates = {}
    for name, op in (("dispatch", "dispatch"), ("combine", COMBINE_OP)):
        rates[name] = row_bytes / (ms[(op, low)] * 1e-3) / low / 1e9
        rates[f"nvlink_{name}"] = row_bytes * peer_share / (ms[(op, high)] * 1e-3) / 1e9
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
            experts: int = 256, nic_gbps: float = 45.0, rates: dict | None = None,
            fp8_dispatch: bool = True) -> dict:
    """rates: measured_rates()'s keys (per-SM and NVLink GB/s of each op)."""
    rates = rates or measured_rates()
    loads = link_loads(world, per_node, tokens, topk, experts)
    out = {}
    for op in ("dispatch", "combine"):
        row = hidden + hidden // 128 * 4 if op == "dispatch" and fp8_dispatch else hidden * 2
        nic_us = loads["nic_rows"] * row / nic_gbps / 1e3
        nvl_us = loads["nvlink_rows"] * row / rates[f"nvlink_{op}"] / 1e3
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
    args = p.parse_args(argv)
    rates = measured_rates()
    print(f"MEASURED ({RESULTS.name}, one GPU per rank): per-SM row rates dispatch "
          f"{rates['dispatch']:.0f} GB/s, combine {rates['combine']:.0f} GB/s; NVLink rates "
          f"dispatch {rates['nvlink_dispatch']:.0f} GB/s, combine {rates['nvlink_combine']:.0f} "
          f"GB/s; ASSUMED NIC {args.nic_gbps:g} GB/s")
    for world in (16, 32):
        result = predict(world, 8, args.tokens, nic_gbps=args.nic_gbps, rates=rates)
        for op, r in result.items():
            dtype = "FP8" if op == "dispatch" else "bf16"
            print(f"EP{world} ({world // 8} nodes of 8) {op} ({dtype}): "
                  f"{r['time_us'] / 1e3:.2f} ms, {r['bound']}-bound, RDMA bottleneck bandwidth "
                  f"{r['rdma_gbps']:.0f} GB/s, needs {r['sms']} SMs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
