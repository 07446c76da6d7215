"""The main job on a CPU-only machine: an emulated world of gloo processes runs the CPU backend's
dispatch and combine (throughput and/or low-latency schedule) at a realistic shape, times them
and checks every rank against the pure-torch reference (testing's recipe: the fake expert's
outputs, written into the combine window, are combined)."""
from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from .. import Communicator, testing
from ..launch import run_world
from .metrics import RoutingBytes, format_table

ITERS = 3
HEADERS = ["op", "tokens/rank x hidden", "topk", "experts", "world", "dtype", "time ms",
           "algbw GB/s/rank", "check"]
OPS = {"throughput": ("dispatch", "combine"),
       "low_latency": ("low_latency_dispatch", "low_latency_combine")}


def world_cases(world, tokens, decode_tokens, hidden, topk, experts, schedules,
                dtype=torch.bfloat16) -> dict:
    """{schedule: testing.Case}: uniform routing, the same tokens on every rank."""
    tokens_of = {"throughput": tokens, "low_latency": decode_tokens}
    return {s: testing.Case(seed=1 + i, dtype=dtype, hidden=hidden, topk=topk,
                            routing="uniform", experts=experts, tokens=(tokens_of[s],) * world)
            for i, s in enumerate(schedules)}


def config(case: testing.Case, schedule: str):
    """The Communicator's config: room for twice the expected rows in the throughput window;
    low-latency windows only for that schedule."""
    if schedule == "throughput":
        return case.config(capacity=case.tokens[0] * case.topk * 2, ll_max_tokens_per_rank=0)
    return case.config()


def _time_schedule(comm, rank, case, schedule) -> tuple[dict, tuple]:
    """Median seconds of dispatch and of combine over ITERS steps (every rank starts each op
    together), and the last step's (dispatch result, combine output)."""
    inp = case.inputs()
    x, idx, w = inp.xs[rank], inp.topk_idx[rank], inp.topk_weights[rank]
    ll = schedule == "low_latency"
    dispatch = comm.low_latency_dispatch if ll else comm.dispatch
    combine = comm.low_latency_combine if ll else comm.combine
    window = comm.low_latency_combine_buffer if ll else comm.combine_buffer
    times_d, times_c = [], []
    for _ in range(ITERS):
        dist.barrier()
        t0 = time.perf_counter()
        handle = dispatch(x, idx, w)
        t1 = time.perf_counter()
        out = window()
        out.copy_(testing.expert_output(handle, out.dtype))  # zero-copy: into the window
        dist.barrier()
        t2 = time.perf_counter()
        y = combine(out, handle)
        t3 = time.perf_counter()
        times_d.append(t1 - t0)
        times_c.append(t3 - t2)
    rb = RoutingBytes.of(idx, case.experts, case.world)
    return dict(dispatch_s=sorted(times_d)[ITERS // 2], combine_s=sorted(times_c)[ITERS // 2],
                pairs=rb.token_rank_pairs), (handle, y)


def _rank_job(rank, world, cases, check):
    torch.set_num_threads(1)
    results = {}
    for schedule, case in cases.items():
        comm = Communicator(dist.group.WORLD, config(case, schedule))
        timed, last = _time_schedule(comm, rank, case, schedule)
        errors = None  # None: not checked
        if check:
            errors = [f"{case}: {e}" for e in
                      testing.check_step(rank, testing.expected(case), *last)]
        results[schedule] = dict(timed, errors=errors)
        if rank == 0:
            state = "" if errors is None else ", check " + ("passed" if not errors else "FAILED")
            print(f"  {schedule}: {case.tokens[0]} tokens/rank, dispatch "
                  f"{timed['dispatch_s'] * 1e3:.1f} ms, combine {timed['combine_s'] * 1e3:.1f} "
                  f"ms (rank 0, median of {ITERS}){state}", flush=True)
    return results


def run(world: int = 4, tokens: int = 256, decode_tokens: int = 32, hidden: int = 7168,
        topk: int = 8, experts: int = 256, schedules=tuple(OPS), check: bool = True,
        out_dir: str | None = None, dtype=torch.bfloat16) -> bool:
    cases = world_cases(world, tokens, decode_tokens, hidden, topk, experts, schedules, dtype)
    print(f"torch_swiftep benchmark, CPU backend: {world} gloo processes on this machine "
          "(no GPU found; the same command uses the CUDA kernels on a GPU); "
          f"{', '.join(cases)} schedule{'s' if len(cases) > 1 else ''}", flush=True)
    results = run_world(world, _rank_job, cases, check, timeout_s=600)
    records, errors = [], []
    for schedule, case in cases.items():
        per_rank = [r[schedule] for r in results]
        state = "skipped" if not check else "passed"
        if check:
            errs = [e for r in per_rank for e in r["errors"]]
            errors += errs
            state = "FAILED" if errs else "passed"
        for op in OPS[schedule]:
            kind = "combine" if op.endswith("combine") else "dispatch"
            t = max(r[f"{kind}_s"] for r in per_rank)  # the world is as slow as its slowest rank
            pairs = sum(r["pairs"] for r in per_rank) / world
            records.append(dict(op=op, schedule=schedule, tokens=case.tokens[0], ms=t * 1e3,
                                algbw_gbps=pairs * hidden * dtype.itemsize / t / 1e9,
                                check=state))
    _report(records, errors, check, dict(world=world, hidden=hidden, topk=topk,
                                          experts=experts, dtype=str(dtype).split(".")[-1]),
            out_dir)
    return not errors


def _report(records, errors, check, shape, out_dir):
    rows = [[r["op"], f"{r['tokens']}x{shape['hidden']}", shape["topk"], shape["experts"],
             shape["world"], shape["dtype"], r["ms"], r["algbw_gbps"], r["check"]]
            for r in records]
    print(format_table(HEADERS, rows))
    for e in errors[:10]:
        print("  ", e)
    summary = "skipped (--no-check)" if not check else "passed" if not errors else "FAILED"
    print("check:", summary)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "cpu_backend.json")
        with open(path, "w") as f:
            json.dump(dict(device="cpu", backend="gloo", **shape, records=records,
                           check=summary.split()[0], errors=errors), f, indent=1)
        print(f"wrote {path}")
        plot(records, os.path.join(out_dir, "cpu_backend.png"), shape)


def plot(records, path, shape):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['op']}\n{r['tokens']} tok/rank" for r in records]
    ax.bar(labels, [r["ms"] for r in records])
    ax.set_ylabel("time per call (ms, slowest rank)")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(f"torch_swiftep CPU backend, {shape['world']} gloo processes, hidden "
                 f"{shape['hidden']}, top-{shape['topk']}, {shape['experts']} experts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
