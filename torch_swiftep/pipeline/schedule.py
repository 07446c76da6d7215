"""The pipelined layer's schedule: its predicted timeline, and a solver that picks it.

A batch of N tokens per rank is cut into chunks. Two streams run them: the communication
stream issues dispatches and combines, the compute stream the experts' GEMMs (and the shared
experts). With two workspaces in turn, dispatch i + 1 may run before combine i, so the
communication stream's order is

    D1 D2 C1 D3 C2 ... Dk C(k-1) Ck        compute: [S] X1 X2 ... Xk      ("shared_first",
                                                     S over the whole batch)
                                            or       S1 X1 S2 X2 ... Sk Xk ("interleaved")

where X_i waits for D_i and C_i for X_i. The solver chooses the number of chunks, their sizes
(not necessarily equal), the compute order and the SMs given to communication, minimizing the
predicted makespan (`simulate`: exact for this two-stream model), and returns the predicted
timeline with its choice.

Two ways to cut the layer (`SPLITS`): chunks of tokens (every chunk runs every local expert:
bit-identical to the unpipelined layer, but each chunk pays the experts' per-chunk cost again),
or chunks of experts (chunk i carries every token's slots whose expert is in group i of each
rank's local experts: each expert's GEMMs run once over all their rows; a token's output is the
sum of its groups' combines, so it differs from the unpipelined layer by rounding). For chunks
of experts a chunk's size is its number of local experts and the model is evaluated at its
share of the tokens (`Schedule.work`: experts x tokens / local experts): the cost model must then
be fitted from samples of expert groups (calibrate.py), whose per-chunk costs differ.

Compute tasks are priced as the layer runs them (`compute_sms`): beside communication, their
GEMMs confined to the SMs communication leaves (the SM carve-out), except the experts of a
one-chunk layer, which have nothing to overlap and get the whole GPU.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

from .cost_model import CostModel

ORDERS = ("shared_first", "interleaved")
SPLITS = ("tokens", "experts")
# Size profiles of the refinement: first and last chunk at this fraction of the others.
RAMPS = (0.25, 0.5, 0.75)
# Coarse candidates whose chunk sizes the local search refines: refining the second best too
# found nothing better on the standard shapes and doubled the solve time.
REFINED = 1
# The finest step of that search, as a fraction of the batch: finer steps cost time and gained
# under 0.1% of predicted layer time.
FINEST_STEP = 1 / 128


class Task(NamedTuple):
    stream: str  # "comm" or "compute"
    name: str  # dispatch / experts / combine / shared
    chunk: int
    start_us: float
    end_us: float


@dataclasses.dataclass(frozen=True)
class Schedule:
    chunks: tuple  # each chunk's size in issue order: tokens per rank, or local experts (split)
    comm_sms: int
    order: str
    predicted_us: float
    timeline: tuple  # Task, in start order
    split: str = "tokens"  # SPLITS: what a chunk is a share of
    unit_tokens: float = 1.0  # tokens per rank one unit of a chunk stands for in the model

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.split == "experts" and self.order != "shared_first":
            raise ValueError("chunks of experts run the shared expert over the whole batch: "
                             f"order must be 'shared_first', got {self.order!r}")

    @property
    def work(self) -> tuple:
        """Each chunk's size in the cost model's unit (tokens per rank)."""
        return tuple(c * self.unit_tokens for c in self.chunks)

    def explain(self) -> str:
        """The choice and its predicted timeline, one task a line."""
        unit = "local experts" if self.split == "experts" else "tokens"
        lines = [f"{len(self.chunks)} chunks of {unit} {list(self.chunks)}, {self.comm_sms} SMs "
                 f"to communication, compute order {self.order}: {self.predicted_us:.1f} us"]
        lines += [f"  {t.stream:<7} {t.name:<8} chunk {t.chunk}  {t.start_us:9.1f} -> "
                  f"{t.end_us:9.1f} us" for t in self.timeline]
        return "\n".join(lines)

    def exposed_comm_us(self) -> float:
        """Time the compute stream sits idle while communication runs (not hidden)."""
        compute = sorted((t.start_us, t.end_us) for t in self.timeline if t.stream == "compute")
        idle, cursor = 0.0, 0.0
        for start, end in compute:
            idle += max(0.0, start - cursor)
            cursor = max(cursor, end)
        return idle + max(0.0, self.predicted_us - cursor)


def _comm_order(k: int) -> list[tuple[str, int]]:
    order = [("dispatch", 0)] + ([("dispatch", 1)] if k > 1 else [])
    for i in range(k):
        order.append(("combine", i))
        if i + 2 < k:
            order.append(("dispatch", i + 2))
    return order


def _compute_order(k: int, order: str, shared: bool, merge: bool) -> list[tuple[str, int]]:
    if merge:  # chunks of experts: merge i (adds combine i) after experts i + 1, the last at
        # the end (layer.py); the shared expert, if any, first over the whole batch
        head = [("shared", -1)] if shared else []
        return head + [("experts", 0)] + [item for i in range(1, k) for item in
                                          (("experts", i), ("merge", i - 1))] + \
            [("merge", k - 1)]
    if not shared:
        return [("experts", i) for i in range(k)]
    if order == "shared_first":  # one shared task over the whole batch (chunk -1)
        return [("shared", -1)] + [("experts", i) for i in range(k)]
    return [item for i in range(k) for item in (("shared", i), ("experts", i))]


def compute_sms(task: str, chunks: int, comm_sms: int) -> int:
    """SMs carved out of `task`'s GEMMs in a layer of `chunks` chunks (0: the whole GPU): the
    layer's policy (layer.py), which the model prices. The experts of a one-chunk layer run
    after its dispatch and before its combine (nothing to overlap); every other compute task
    runs beside communication."""
    return 0 if task == "experts" and chunks == 1 else comm_sms


def linear_for(model: CostModel, comm_sms: int, chunks: int,
               alone: Optional[dict] = None) -> dict:
    """model.linear(comm_sms) with each compute task at its `compute_sms` budget: what
    makespan() takes for a layer of `chunks` chunks. alone: model.linear(0), if already made."""
    linear = model.linear(comm_sms)
    if chunks == 1 and "experts" in linear:
        linear["experts"] = (alone or model.linear(0))["experts"]
    return linear


def merges(model: CostModel, split: str, chunks: int) -> bool:
    """Whether the layer's timeline has merge tasks the model prices: chunks of experts (more
    than one) add their combines into a float32 total on the compute stream (layer.py)."""
    return split == "experts" and chunks > 1 and model.has("merge")


def simulate(model: CostModel, chunks: Sequence[float], comm_sms: int,
             order: str = "interleaved", shared: bool = False,
             split: str = "tokens") -> tuple[float, list]:
    """(makespan us, timeline) of one layer under this schedule; chunks in tokens per rank
    (Schedule.work)."""
    k = len(chunks)
    merge = merges(model, split, k)
    streams = {"comm": _comm_order(k), "compute": _compute_order(k, order, shared, merge)}
    depends = {"experts": "dispatch", "combine": "experts", "merge": "combine"}
    cursor = {"comm": 0.0, "compute": 0.0}
    head = {"comm": 0, "compute": 0}
    end: dict[tuple[str, int], float] = {}
    timeline = []
    while head["comm"] < len(streams["comm"]) or head["compute"] < len(streams["compute"]):
        progressed = False
        for stream in ("comm", "compute"):
            if head[stream] == len(streams[stream]):
                continue
            name, i = streams[stream][head[stream]]
            dep = depends.get(name)
            if dep is not None and (dep, i) not in end:
                continue
            start = max(cursor[stream], end[(dep, i)] if dep else 0.0)
            sms = comm_sms if stream == "comm" else compute_sms(name, k, comm_sms)
            whole = i < 0 or name == "merge"  # the shared expert first, a merge: all tokens
            finish = start + model.time(name, sum(chunks) if whole else chunks[i], sms)
            end[(name, i)] = cursor[stream] = finish
            timeline.append(Task(stream, name, max(i, 0), start, finish))
            head[stream] += 1
            progressed = True
        if not progressed:  # cannot happen for the orders above
            raise RuntimeError("schedule deadlock")
    timeline.sort(key=lambda t: (t.start_us, t.stream))
    return max(cursor.values()), timeline


def makespan(linear: dict, chunks: Sequence[int], order: str, shared: bool,
             merge: bool = False) -> float:
    """simulate()'s makespan without the timeline, from linear_for(model, s, len(chunks)):
    the solver's inner loop (microseconds a call). Walks the two streams in the order above;
    a task's time is fixed + max(floor, n * slope). merge: merges(model, split, len(chunks)):
    compute [S] X0 X1 M0 X2 M1 ... M(k-1), merge i after combine i, each over all the tokens."""
    (fd, sd, ld), (fx, sx, lx), (fc, sc, lc) = \
        linear["dispatch"], linear["experts"], linear["combine"]
    fs, ss, ls = linear["shared"] if shared else (0.0, 0.0, 0.0)
    k, total = len(chunks), sum(chunks)
    m = 0.0  # one merge
    if merge:
        fm, sm, lm = linear["merge"]
        m = fm + (total * sm if total * sm > lm else lm)
    d = [fd + (n * sd if n * sd > ld else ld) for n in chunks]
    comp = 0.0
    if shared and (merge or order == "shared_first"):  # one shared task over the whole batch
        comp = fs + (total * ss if total * ss > ls else ls)
    interleaved = shared and not merge and order == "interleaved"
    end_d, end_c = [0.0] * k, [0.0] * k
    comm = end_d[0] = d[0]
    if k > 1:
        comm = end_d[1] = comm + d[1]
    for i, n in enumerate(chunks):
        if interleaved:
            comp += fs + (n * ss if n * ss > ls else ls)
        comp = (comp if comp > end_d[i] else end_d[i]) + fx + (n * sx if n * sx > lx else lx)
        comm = end_c[i] = (comm if comm > comp else comp) + fc + (n * sc if n * sc > lc else lc)
        if merge and i > 0:
            comp = (comp if comp > end_c[i - 1] else end_c[i - 1]) + m
        if i + 2 < k:
            comm = end_d[i + 2] = comm + d[i + 2]
    if merge:
        return (comp if comp > end_c[-1] else end_c[-1]) + m
    return comm if comm > comp else comp


def equal_chunks(tokens: int, k: int, granularity: int = 1) -> tuple:
    """k chunks (fewer if there are not enough granules), multiples of `granularity` but the
    last, which takes the remainder."""
    units = -(-tokens // granularity)
    k = max(1, min(k, units))
    base, extra = divmod(units, k)
    sizes = [(base + (1 if i < extra else 0)) * granularity for i in range(k)]
    sizes[-1] -= units * granularity - tokens
    return tuple(sizes)


def ramp_chunks(tokens: int, k: int, ramp: float, granularity: int = 1) -> tuple:
    """First and last chunk at `ramp` times the size of the others (k >= 3)."""
    weights = [ramp] + [1.0] * (k - 2) + [ramp]
    raw = [tokens * w / sum(weights) for w in weights]
    sizes = [max(granularity, round(r / granularity) * granularity) for r in raw]
    sizes[len(sizes) // 2] += tokens - sum(sizes)
    return tuple(sizes) if min(sizes) > 0 else equal_chunks(tokens, k, granularity)


def _refine(linear, chunks, order, shared, t, tokens, granularity, merge=False):
    """Local search over the sizes: the ramps, then moving `step` tokens between neighbours
    while the makespan drops, the step halving from ~tokens / 16 to ~tokens * FINEST_STEP
    (at least `granularity`)."""
    for ramp in RAMPS if len(chunks) >= 3 else ():
        candidate = ramp_chunks(tokens, len(chunks), ramp, granularity)
        ct = makespan(linear, candidate, order, shared, merge)
        if ct < t:
            t, chunks = ct, candidate
    sizes = list(chunks)
    finest = max(granularity, int(tokens * FINEST_STEP) // granularity * granularity)
    step = finest
    while step * 2 <= tokens // 16:
        step *= 2
    while step >= finest:
        improved = True
        while improved:
            improved = False
            for i in range(len(sizes) - 1):
                for src, dst in ((i, i + 1), (i + 1, i)):
                    if sizes[src] <= step:
                        continue
                    sizes[src] -= step
                    sizes[dst] += step
                    ct = makespan(linear, sizes, order, shared, merge)
                    if ct < t - 1e-9:
                        t, improved = ct, True
                    else:
                        sizes[src] += step
                        sizes[dst] -= step
        step //= 2
    return t, tuple(sizes)


def _per_unit(linear: dict, unit: float) -> dict:
    """linear (per token) with its slopes per chunk unit of `unit` tokens."""
    return {task: (f, slope * unit, floor) for task, (f, slope, floor) in linear.items()}


def solve(model: CostModel, tokens: int, *, shared: bool = False,
          sms_options: Sequence[int] = (2, 4, 8, 12, 16, 24, 32), max_chunks: int = 8,
          granularity: int = 1, fixed_chunks: Optional[int] = None, split: str = "tokens",
          local_experts: Optional[int] = None) -> Schedule:
    """The schedule with the least predicted makespan for `tokens` tokens per rank.
    fixed_chunks: only that many chunks (1: the unpipelined layer, for comparison).
    split="experts": chunks are groups of a rank's `local_experts` experts (model fitted on
    expert groups; the shared expert, if any, runs first over the whole batch)."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "experts":
        if not isinstance(local_experts, int) or local_experts <= 0:
            raise ValueError("split='experts' needs local_experts, the experts of one rank, got "
                             f"{local_experts!r}")
        unit = tokens / local_experts
        best = _solve_units(model, local_experts, unit, shared, sms_options, max_chunks, 1,
                            fixed_chunks, ORDERS[:1], split)
    else:
        unit = 1.0
        best = _solve_units(model, tokens, unit, shared, sms_options, max_chunks, granularity,
                            fixed_chunks, ORDERS if shared else ORDERS[-1:], split)
    t, chunks, s, order = best
    sizes = tuple(c * unit for c in chunks)
    predicted, timeline = simulate(model, sizes, s, order, shared, split)
    return Schedule(tuple(chunks), s, order, predicted, tuple(timeline), split, unit)


def _solve_units(model, units, unit, shared, sms_options, max_chunks, granularity,
                 fixed_chunks, orders, split):
    """(makespan, chunks, comm SMs, order) of the best schedule of `units` units of `unit`
    tokens each: a coarse search over equal chunks, then the best refined."""
    sms = [s for s in sms_options if 0 < s < model.total_sms]
    if not sms:
        raise ValueError(f"no SM budget in {tuple(sms_options)} is inside (0, "
                         f"{model.total_sms})")
    counts = [fixed_chunks] if fixed_chunks else range(1, min(max_chunks, units) + 1)
    coarse = []
    splits = [equal_chunks(units, k, granularity) for k in counts]
    alone = model.linear(0)

    def linear(s, k):
        return _per_unit(linear_for(model, s, k, alone), unit)
    for s in sms:
        by_count = {1: linear(s, 1), 2: linear(s, 2)}
        for chunks in splits:
            for order in orders:
                merge = merges(model, split, len(chunks))
                coarse.append((makespan(by_count[min(len(chunks), 2)], chunks, order, shared,
                                        merge), chunks, s, order))
    coarse.sort(key=lambda c: c[0])
    best = None
    for t, chunks, s, order in coarse[:REFINED]:
        t, chunks = _refine(linear(s, len(chunks)), chunks, order, shared, t, units,
                            granularity, merges(model, split, len(chunks)))
        if best is None or t < best[0]:
            best = (t, chunks, s, order)
    return best
