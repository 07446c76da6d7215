"""Throughput schedule on a GPU: W ranks emulated inside ONE process on one GPU
(emulated_world.py).

All ranks' calls of one step are captured in one CUDA graph (fork/join over the ranks' streams)
and replayed, so host launch gaps stay out of the figures. Reported per shape: time, algorithm
bandwidth (DeepEP's convention), SMs used, and HBM-traffic efficiency = least bytes the op must
move / time / the device-to-device copy rate measured in the same run (both counting read +
write). The plain-torch path a user would otherwise write runs in the same process for
comparison.
"""
from __future__ import annotations

import json
import os

import torch

from .emulated_world import EmulatedWorld
from .metrics import combine_min_bytes, dispatch_min_bytes, format_table
from .timing import copy_ceiling_gbps, graph_ms
from .torch_baseline import torch_baseline_ms

HEADERS = ["op", "tokens/rank", "SMs/rank", "SMs total", "time ms", "algbw GB/s/rank",
           "rows GB/s/rank", "HBM eff", "vs torch"]


def measure(shape, tokens, sms, ceiling, check, device) -> tuple[list[dict], list[str]]:
    """(records of dispatch and combine, check errors) at one point: tokens per rank, sms
    SMs per rank. Combine time = dispatch + combine graph - dispatch graph."""
    world, hidden = shape["world"], shape["hidden"]
    w = EmulatedWorld(world, tokens, hidden, shape["topk"], shape["experts"], torch.bfloat16,
                      device, seed=tokens)
    row_bytes = hidden * 2
    d_ms, handles = graph_ms(w.dispatch_step(sms))
    w.fill_combine_windows(handles)
    dc_ms, pairs = graph_ms(w.dispatch_combine_step(sms))
    torch.cuda.synchronize()
    errors = w.check(pairs, [0, world - 1]) if check else []
    c_ms = max(dc_ms - d_ms, 1e-6)
    # the experts' outputs in a tensor of their own (a grouped GEMM's): combine stages them
    do_ms, pairs = graph_ms(w.dispatch_combine_step(sms, own_tensor=True))
    torch.cuda.synchronize()
    errors += w.check(pairs, [0, world - 1]) if check else []
    own_ms = max(do_ms - d_ms, 1e-6)
    pairs_per_rank = sum(r.token_rank_pairs for r in w.routing) / world
    d_min = sum(dispatch_min_bytes(r, row_bytes) for r in w.routing)
    c_min = sum(combine_min_bytes(r, row_bytes) for r in w.routing)
    rows_written = sum(r.rows for r in w.routing) * row_bytes
    records = []
    for op, ms, least in (("dispatch", d_ms, d_min), ("combine", c_ms, c_min),
                          ("combine, own tensor", own_ms, c_min)):
        records.append(dict(
            op=op, tokens=tokens, sms_per_rank=sms, sms_total=sms * world, ms=ms,
            algbw_gbps=pairs_per_rank * row_bytes / (ms * 1e-3) / 1e9,
            moved_gbps=rows_written / world / (ms * 1e-3) / 1e9,
            hbm_eff=least / (ms * 1e-3) / 1e9 / ceiling))
    w.free()
    print(f"  {tokens} tokens/rank, {sms} SMs/rank: dispatch {d_ms:.3f} ms, combine "
          f"{c_ms:.3f} ms (from the experts' own tensor {own_ms:.3f} ms)"
          + (f", check {'passed' if not errors else 'FAILED'}" if check else ""), flush=True)
    return records, errors


def run(world=8, tokens=4096, hidden=7168, topk=8, experts=256, sms_per_rank=(1, 2, 3, 4),
        token_sweep=(512, 1024, 2048, 4096), out_dir=None, check=True) -> bool:
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    ceiling = copy_ceiling_gbps(device)
    print(f"torch_swiftep benchmark on {props.name} ({props.multi_processor_count} SMs): "
          f"{world} ranks emulated in one process; device-to-device copy "
          f"{ceiling:.0f} GB/s (read + write)")
    shape = dict(world=world, hidden=hidden, topk=topk, experts=experts)
    records, errors = [], []
    points = [(tokens, sms, check and sms == sms_per_rank[-1]) for sms in sms_per_rank]
    points += [(tok, sms_per_rank[-1], False) for tok in token_sweep if tok != tokens]
    for tok, sms, check_now in points:
        recs, errs = measure(shape, tok, sms, ceiling, check_now, device)
        records += recs
        errors += errs
    baseline = torch_baseline_ms(world, tokens, hidden, topk, experts, torch.bfloat16, device)
    _report(records, baseline, tokens, props.name, ceiling, shape, out_dir)
    for e in errors[:10]:
        print("CHECK FAILED:", e)
    print("check:", "passed" if not errors else "FAILED")
    return not errors


def _report(records, baseline, tokens, device_name, ceiling, shape, out_dir):
    table = []
    for rec in records:
        speedup = ""
        if rec["tokens"] == tokens:
            speedup = f"{baseline[rec['op'].split(',')[0]] / rec['ms']:.1f}x"
        table.append([rec["op"], rec["tokens"], rec["sms_per_rank"], rec["sms_total"],
                      rec["ms"], rec["algbw_gbps"], rec["moved_gbps"],
                      f"{rec['hbm_eff']:.0%}", speedup])
    print(format_table(HEADERS, table))
    print(f"plain torch at {tokens} tokens/rank (whole GPU, all ranks back to back): "
          f"dispatch {baseline['dispatch']:.3f} ms, combine {baseline['combine']:.3f} ms")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "throughput.json"), "w") as f:
            json.dump(dict(device=device_name, ceiling_gbps=ceiling, **shape,
                           records=records, baseline_ms=baseline), f, indent=1)
        plot(records, tokens, os.path.join(out_dir, "throughput.png"), device_name,
             shape["world"])


def plot(records, tokens, path, device_name, world):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    top = max(r["sms_per_rank"] for r in records)
    for op, marker in (("dispatch", "o"), ("combine", "s"), ("combine, own tensor", "^")):
        by_sms = sorted((r["sms_total"], r["algbw_gbps"]) for r in records
                        if r["op"] == op and r["tokens"] == tokens)
        axes[0].plot(*zip(*by_sms), marker=marker, label=op)
        by_tok = sorted((r["tokens"], r["algbw_gbps"]) for r in records
                        if r["op"] == op and r["sms_per_rank"] == top)
        axes[1].plot(*zip(*by_tok), marker=marker, label=op)
    axes[0].set_xlabel(f"SMs used (all {world} ranks)")
    axes[0].set_title(f"{tokens} tokens/rank")
    axes[1].set_xlabel("tokens per rank")
    axes[1].set_xscale("log", base=2)
    axes[1].set_title(f"{top * world} SMs")
    for ax in axes:
        ax.set_ylabel("algorithm bandwidth per rank (GB/s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"torch_swiftep, {world} ranks emulated on one {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
