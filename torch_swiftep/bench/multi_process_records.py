"""The multi-process benchmark's records and table (unit-tested on CPU): per SM budget and op,
the slowest rank's time, its algorithm bandwidth, its fraction of the copy ceiling, and its
ratio to each peer's figure at the same budget."""
from __future__ import annotations

OPS = ("dispatch", "combine", "combine, own tensor", "combine, torch copy",
       "combine, symmetric pool", "step, own tensor", "step, symmetric pool")
PEER_OP = {"dispatch": "dispatch", "combine": "combine", "combine, own tensor": "combine",
           "combine, torch copy": "combine", "combine, symmetric pool": "combine",
           "step, own tensor": "step",
           "step, symmetric pool": "step"}  # the peer figure each swiftep op is compared with
PEERS = ("deepep", "torch")
HEADERS = ["op", "SMs/rank", "SMs total", "ms", "algbw GB/s/rank", "of ceiling", "DeepEP ms",
           "vs DeepEP"]
PEER_COLUMNS = {"deepep+permute": ["DeepEP+permute ms", "vs +permute"],
                "torch": ["torch a2a ms", "vs torch"]}



def per_rank_ops(slopes: dict) -> dict:
    """One rank's ms per call of each op from its chain slopes (dispatch; pair: dispatch +
    zero-copy combine; pair_own: dispatch + combine from the experts' own tensor; pair_copy:
    dispatch + a torch copy of that tensor into the window + zero-copy combine; pair_sym:
    dispatch + combine(symmetric=True) of a tensor from the symmetric memory pool)."""
    d = slopes["dispatch"]
    return {"dispatch": d, "combine": slopes["pair"] - d,
            "combine, own tensor": slopes["pair_own"] - d,
            "combine, torch copy": slopes["pair_copy"] - d,
            "combine, symmetric pool": slopes["pair_sym"] - d,
            "step, own tensor": slopes["pair_own"], "step, symmetric pool": slopes["pair_sym"]}


def slowest(per_rank: list) -> dict:
    """Per op, the slowest rank's ms (the world is as fast as its slowest rank)."""
    return {op: max(r[op] for r in per_rank) for op in per_rank[0]}


def algbw_gbps(pairs_per_rank: float, hidden: int, ms: float, elem_bytes: int = 2) -> float:
    """DeepEP's algorithm bandwidth: (token, rank) pairs x hidden x element size / time."""
    return pairs_per_rank * hidden * elem_bytes / (ms * 1e-3) / 1e9


def ceiling_fraction(least_bytes: float, ms: float, payload_gbps) -> float | None:
    """Least bytes (read + write) per second over the copy ceiling's read + write rate
    (2 x its payload rate); None when the ceiling was not measured."""
    if not payload_gbps:
        return None
    return least_bytes / (ms * 1e-3) / 1e9 / (2 * payload_gbps)


def build_records(swiftep: dict, world_bytes: dict, ceiling: dict, world: int, hidden: int,
                  peers: dict, sharing: int | None = None,
                  link_gbps: float | None = None) -> list[dict]:
    """One record per (SM budget, op). swiftep: {sms: {op: ms}} (slowest rank); world_bytes:
    pairs_per_rank, dispatch and combine least bytes of the whole world; ceiling: {SMs busy on
    one GPU: payload GB/s}; peers: {name: peer result with by_sms {sms: {dispatch, combine,
    step}}}; sharing: ranks per GPU (default: world, every rank on one GPU). The ceiling is one
    GPU's, at its ranks' SMs: the least bytes are those of one GPU's ranks. link_gbps (a GPU per
    rank): the link's one-way rate; dispatch and combine records then get link_fraction, the
    bytes the busiest rank moves over its link (world_bytes link_dispatch / link_combine) per
    second over it."""
    sharing = sharing or world
    least = {k: v * sharing / world for k, v in (("dispatch", world_bytes["dispatch"]),
             ("combine", world_bytes["combine"]),
             ("step", world_bytes["dispatch"] + world_bytes["combine"]))}
    records = []
    for sms in sorted(swiftep):
        for op in OPS:
            ms, kind = swiftep[sms][op], PEER_OP[op]
            both = 2 if kind == "step" else 1  # a step moves the pairs there and back
            frac = ceiling_fraction(least[kind], ms, ceiling.get(sms * sharing))
            link = world_bytes.get(f"link_{kind}") if link_gbps else None
            rec = dict(op=op, sms_per_rank=sms, sms_total=sms * sharing, ms=ms,
                       algbw_gbps=both * algbw_gbps(world_bytes["pairs_per_rank"], hidden, ms),
                       least_bytes=least[kind], ceiling_fraction=frac, peers={},
                       link_fraction=None if link is None else link / (ms * 1e-3) / 1e9 / link_gbps)
            for name, peer in peers.items():
                peer_ms = (peer.get("by_sms") or {}).get(sms, {}).get(kind)
                if peer_ms:
                    rec["peers"][name] = dict(ms=peer_ms, speedup=peer_ms / ms)
            records.append(rec)
    return records


def format_report(records: list[dict], peers: dict) -> str:
    """The table: DeepEP's columns always (blank when it did not run), the others' when they ran.
    vs X = X's ms / swiftep's ms (> 1: swiftep is faster)."""
    from .metrics import format_table

    extra = [n for n in PEER_COLUMNS if any(n in r["peers"] for r in records)]
    with_link = any(r.get("link_fraction") is not None for r in records)
    headers = HEADERS[:6] + (["of link"] if with_link else []) + HEADERS[6:] \
        + [h for n in extra for h in PEER_COLUMNS[n]]
    rows = []
    for r in records:
        frac = r["ceiling_fraction"]
        link = r.get("link_fraction")
        row = [r["op"], r["sms_per_rank"], r["sms_total"], r["ms"], r["algbw_gbps"],
               "-" if frac is None else f"{frac:.0%}"]
        row += (["-" if link is None else f"{link:.0%}"] if with_link else [])
        for name in ["deepep"] + extra:
            p = r["peers"].get(name)
            row += [p["ms"], f"{p['speedup']:.2f}x"] if p else ["-", "-"]
        rows.append(row)
    lines = [format_table(headers, rows)]
    for name, peer in peers.items():
        said = [f"{k.replace('_', ' ')}: {peer[k]}" for k in ("timing", "sm_budget") if peer.get(k)]
        lines.append("; ".join([f"{name}: {peer.get('status')}"] + said))
        lines += [f"  {note}" for note in peer.get("notes", [])]
    return "\n".join(lines)


def fit_budgets(budgets, world: int, device_sms: int) -> tuple[list, list]:
    """(budgets whose W x SMs fit on the GPU at once, messages for those dropped): under MPS the
    ranks spin on each other, so every rank's blocks must be resident together."""
    kept, dropped = [], []
    for sms in budgets:
        if sms * world <= device_sms:
            kept.append(sms)
        else:
            dropped.append(f"{sms} SMs/rank dropped: {world} x {sms} blocks exceed the GPU's "
                           f"{device_sms} SMs (ranks would wait for blocks that cannot start)")
    return kept, dropped
