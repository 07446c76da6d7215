"""Phase trace of the low-latency kernels: where a decode call's microseconds go.

With ``ctrl.trace_on`` set, the low-latency dispatch and combine kernels stamp ``%globaltimer``
at the points plan.TRACE_POINTS names, one row per call (a ring of plan.TRACE_CALLS rows). This
module switches the stamps on for a chained graph, reads every rank's ring back and reduces it to
one line per point: when the earliest and the latest rank reached it, in microseconds from the
first rank's dispatch start of the same call, median over the calls.
"""
from __future__ import annotations

import statistics

import torch

from .. import plan as plan_mod


def _region(comm, field, shape):
    return plan_mod.ctrl_region(comm.workspace, comm.plan.as_list(), field, torch.int64, shape)


def record(comms, replay) -> torch.Tensor:
    """Runs replay() (a captured chain of low-latency calls) with the stamps on; returns the
    rings, int64 [world, TRACE_CALLS, points] in ns (0: never stamped)."""
    shape = (plan_mod.TRACE_CALLS, len(plan_mod.TRACE_POINTS))
    for comm in comms:
        _region(comm, "trace", shape).zero_()
        _region(comm, "trace_on", (1,)).fill_(1)
    torch.cuda.synchronize()
    try:
        replay()
        torch.cuda.synchronize()
        return torch.stack([_region(comm, "trace", shape).cpu() for comm in comms])
    finally:
        for comm in comms:
            _region(comm, "trace_on", (1,)).zero_()
        torch.cuda.synchronize()


def summarize(rings: torch.Tensor) -> dict:
    """{point: (earliest rank us, latest rank us)} from the first rank's dispatch start of the
    same call, medians over the calls every rank stamped; 'per_rank' ({point: each rank's
    median us}); 'period' (us between one call's first dispatch start and the next one's) and
    'gap' (a rank's combine end to its next dispatch start: the kernel launches in between)."""
    names = plan_mod.TRACE_POINTS
    start, c_end = names.index("dispatch_start"), names.index("combine_end")
    # Rows are a ring by epoch: sort each rank's stamped rows by time, so row j is the same call
    # on every rank (each rank ran the same calls).
    per_rank = []
    for ring in rings:
        rows = [row for row in ring.tolist() if row[start] > 0]
        per_rank.append(sorted(rows, key=lambda row: row[start]))
    calls = min(len(rows) for rows in per_rank)
    if calls == 0:
        return {}
    per_rank = [rows[-calls:] for rows in per_rank]
    t0 = [min(rows[j][start] for rows in per_rank) for j in range(calls)]
    out, by_rank = {}, {}
    for p, name in enumerate(names):
        each = []  # per call stamped by every rank: us of rank r, in rank order
        for j in range(calls):
            stamps = [rows[j][p] for rows in per_rank if rows[j][p] > 0]
            if len(stamps) == len(per_rank):
                each.append([(t - t0[j]) / 1e3 for t in stamps])
        if each:
            out[name] = (statistics.median(min(call) for call in each),
                         statistics.median(max(call) for call in each))
            by_rank[name] = [statistics.median(call[r] for call in each)
                             for r in range(len(per_rank))]
    out["per_rank"] = by_rank  # {point: [median us of rank r]}: which rank is late, and where
    if calls > 1:
        out["period"] = statistics.median((t0[j + 1] - t0[j]) / 1e3 for j in range(calls - 1))
        gaps = [(rows[j + 1][start] - rows[j][c_end]) / 1e3 for rows in per_rank
                for j in range(calls - 1) if rows[j][c_end] > 0]
        if gaps:
            out["gap"] = statistics.median(gaps)
    return out


def format_summary(title: str, summary: dict) -> str:
    lines = [f"phase trace, {title} (us from the first rank's dispatch start; median over calls)"]
    by_rank = summary.get("per_rank", {})
    world = len(next(iter(by_rank.values()), []))
    lines.append(f"  {'point':<24} {'earliest rank':>13} {'latest rank':>12}  "
                 + " ".join(f"{f'rank {r}':>7}" for r in range(world)))
    for name in plan_mod.TRACE_POINTS:
        if name in summary:
            lo, hi = summary[name]
            ranks = " ".join(f"{t:>7.2f}" for t in by_rank.get(name, []))
            lines.append(f"  {name:<24} {lo:>13.2f} {hi:>12.2f}  {ranks}")
    if "period" in summary:
        gap = (f"; combine end to next dispatch start on one rank {summary['gap']:.2f} us"
               if "gap" in summary else "")
        lines.append(f"  call period {summary['period']:.2f} us{gap}")
    return "\n".join(lines)
