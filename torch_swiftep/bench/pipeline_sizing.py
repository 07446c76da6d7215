"""The multi-process pipeline benchmark's arithmetic (unit-tested on CPU): which SM budgets a
world can run, the GEMMs' carve-out, the window's rows, the check's chunkings, the figures the
issue asks for from the slowest rank's times. `sharing` is the ranks on one GPU (1 with one GPU
per rank; W when every rank shares one GPU under MPS)."""
from __future__ import annotations

import math

from ..pipeline import Sample, equal_chunks
from .multi_process_records import fit_budgets

# Experts of the whole model, num_experts / W per rank (pipeline_layer's SHAPES hold one EP8
# rank's share: its world of one).
MODEL_EXPERTS = {"deepseek-v3": 256, "qwen3-moe": 128, "tiny": 16}
CUDA_SMS, CPU_SMS = (2, 4, 8, 12), (4, 8)
CPU_DEVICE_SMS = 132  # nominal on CPU, where nothing is carved out
CHUNK_COUNTS = (1, 2, 4, 8)
POLICIES = ("share", "comm", "off")
# Window rows per rank over an even routing's tokens x top-k: the random router is close to
# even; the worst case (W x tokens x top-k) would not fit 8 ranks' windows on one GPU.
CAPACITY_FACTOR = 1.5
# The real GEMMs' check: max |pipelined - unpipelined| / max |unpipelined|. A differently
# blocked bf16 GEMM differs by rounding (~1e-2 at most); a token routed or combined wrongly, O(1).
CHECK_TOLERANCE = 0.05


def carveout_sms(comm_sms: int, device_sms: int, sharing: int, policy: str = "share") -> int:
    """SMs carved out of a rank's GEMMs beside communication at comm_sms SMs per rank (0: none
    beside them). share: the GEMMs get device_sms // sharing - comm_sms (1: as the layer)."""
    return {"off": 0, "comm": comm_sms,
            "share": device_sms - device_sms // sharing + comm_sms}[policy]


def usable_budgets(budgets, sharing: int, device_sms: int) -> tuple[list, list]:
    """(budgets whose blocks fit one GPU with its `sharing` ranks and leave a rank's GEMMs SMs,
    messages for the rest)."""
    kept, dropped = fit_budgets(budgets, sharing, device_sms)
    share = device_sms // sharing
    dropped += [f"{s} SMs/rank dropped: not below a rank's share of {share} SMs (its GEMMs "
                "would get none)" for s in kept if s >= share]
    return [s for s in kept if s < share], dropped


def world_capacity(tokens: int, topk: int, world: int, local: int) -> int:
    """Window rows per rank: CAPACITY_FACTOR x tokens x top-k, at least 1024, at most the worst
    case W x tokens x min(top-k, local experts)."""
    return min(world * tokens * min(topk, local),
               max(1024, math.ceil(CAPACITY_FACTOR * tokens * topk)))


def check_chunkings(n: int) -> list[tuple]:
    """Pipelined chunkings (2+ chunks) of an n-token check: equal and uneven."""
    candidates = (equal_chunks(n, 2), equal_chunks(n, 4), (1, n - 1), (1, n // 3, n - 1 - n // 3))
    return [c for c in dict.fromkeys(candidates) if len(c) > 1 and min(c) > 0]


def check_groupings(local: int) -> list[tuple]:
    """Pipelined chunkings (2+ groups) of a rank's `local` experts: equal and uneven."""
    candidates = (equal_chunks(local, 2), equal_chunks(local, 4), (1, local - 1))
    return [c for c in dict.fromkeys(candidates) if len(c) > 1 and min(c) > 0]


def slowest_samples(per_rank: list) -> list[Sample]:
    """Per sample the slowest rank's time; every rank measured the same samples in order."""
    if len({len(r) for r in per_rank}) != 1 or any(len({r[:3] for r in rows}) != 1
                                                   for rows in zip(*per_rank)):
        raise ValueError("the ranks measured different samples")
    return [Sample(*rows[0][:3], max(r[3] for r in rows)) for rows in zip(*per_rank)]


def summarize(sweep: dict, chosen_us: float, comm_sms: int, predicted_us: float) -> dict:
    """The issue's figures from the slowest rank's times; sweep: {(chunks, SMs/rank): us}."""
    serial_sms = min((s for k, s in sweep if k == 1), key=lambda s: sweep[(1, s)])
    serial_us, best = sweep[(1, serial_sms)], min(sweep, key=sweep.get)
    return dict(serial_us=serial_us, serial_comm_sms=serial_sms, chosen_us=chosen_us,
                predicted_us=predicted_us, prediction_error=(predicted_us - chosen_us) / chosen_us,
                sweep_best=dict(chunks=best[0], comm_sms=best[1], us=sweep[best]),
                speedup=serial_us / chosen_us, vs_sweep_best=chosen_us / sweep[best],
                speedup_same_sms=sweep.get((1, comm_sms), math.nan) / chosen_us)
