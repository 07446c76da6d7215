"""Cost model of one MoE layer's tasks, fitted from measured times (FinDEP's scheduling input).

Each task's time, in microseconds, for `tokens` tokens per rank when the communication kernels
get `comm_sms` of the GPU's `total_sms` SMs (s of G):

    dispatch, combine:  fixed + per_call_sm / s + tokens * (per_token_sm / s + per_token)
                        (per-SM work, the schedule's SM-bound term, plus a link-bound term;
                        per_call_sm: work every call does over all of a rank's tokens
                        whatever the chunk holds, e.g. a chunk of experts, whose call still
                        reads every token's routing and writes every token's output row)
    experts, shared:    fixed + max(floor, tokens * (per_token + beside * s / (G - s)))
                        s = 0: the task alone on the whole GPU. s > 0: beside communication,
                        its GEMMs confined to G - s SMs (the layer's SM carve-out); `beside` is
                        the measured interference (beside = per_token is the ideal G / (G - s)
                        slowdown). floor: a chunk too small to be compute-bound still streams
                        every local expert's weights (a roofline floor; 0 when not measured).
    attention:          as experts (optional: a layer's attention when the caller gives it)
    merge:              as experts, at all the batch's tokens: chunks of experts add each
                        chunk's combine into a float32 total (optional; layer.py)

Every term but the floor is linear in its coefficients: `fit` is a least-squares solve per
task, and for compute tasks a search over which small samples sit on the floor. The object
prints as a table, round-trips through JSON, and `relative_errors` says how well it predicts
the samples it was fitted on or any others.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable, NamedTuple

import torch

COMM_TASKS = ("dispatch", "combine")
COMPUTE_TASKS = ("experts", "shared", "attention", "merge")
TASKS = COMM_TASKS + COMPUTE_TASKS
JSON_VERSION = 3  # 2: no per_call_sm (0); 1 (no "version"): compute tasks were fixed + tokens *
# c1 * G / (G - s)


class Sample(NamedTuple):
    """One measured task time: task name, tokens per rank, SMs given to communication (0 for a
    compute task measured alone on the whole GPU), us."""

    task: str
    tokens: int
    comm_sms: int
    us: float


def _features(task: str, tokens: float, comm_sms: int, total_sms: int) -> tuple:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task in COMM_TASKS:
        if not 0 < comm_sms < total_sms:
            raise ValueError(f"comm_sms must be in (0, total_sms={total_sms}) for {task}, got "
                             f"{comm_sms}")
        return (1.0, tokens / comm_sms, float(tokens), 1.0 / comm_sms)
    if not 0 <= comm_sms < total_sms:
        raise ValueError(f"comm_sms must be in [0, total_sms={total_sms}) for {task} (0: alone), "
                         f"got {comm_sms}")
    return (1.0, float(tokens), tokens * comm_sms / (total_sms - comm_sms))


def _normalized(coefficients: dict) -> dict:
    out = {}
    for task, values in coefficients.items():
        values = tuple(float(v) for v in values)
        if len(values) == 3:
            values += (0.0,)  # compute: no floor; communication: no per-call term
        if len(values) != 4:
            raise ValueError(f"{task} takes 4 coefficients (3: the last one 0), got {values}")
        out[task] = values
    return out


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Coefficients per task: comm (fixed, per-token-per-SM, per-token, per-call-per-SM);
    compute (fixed, per-token alone, per-token interference beside communication, floor);
    module docstring."""

    total_sms: int
    coefficients: dict

    def __post_init__(self):
        object.__setattr__(self, "coefficients", _normalized(self.coefficients))

    def time(self, task: str, tokens: float, comm_sms: int) -> float:
        """Predicted microseconds of `task` over `tokens` tokens per rank (0 tokens: 0 us)."""
        if tokens <= 0:
            return 0.0
        if task not in self.coefficients:
            raise KeyError(f"the cost model has no {task!r} task (it has "
                           f"{sorted(self.coefficients)}): fit it with samples of that task")
        fixed, slope, floor = self._linear(task, comm_sms)
        return fixed + max(floor, tokens * slope)

    def has(self, task: str) -> bool:
        return task in self.coefficients

    def _linear(self, task: str, comm_sms: int) -> tuple:
        c = self.coefficients[task]
        f = _features(task, 1.0, comm_sms, self.total_sms)
        slope = sum(ci * xi for ci, xi in zip(c[1:3], f[1:3]))
        if task in COMM_TASKS:
            return (c[0] + c[3] * f[3], slope, 0.0)
        return (c[0], slope, c[3])

    def linear(self, comm_sms: int) -> dict:
        """task -> (fixed us, us per token, floor us) at this SM budget: time = fixed +
        max(floor, tokens * slope) for tokens > 0 (the solver's inner loop uses it).
        comm_sms = 0: compute tasks alone, no communication task."""
        return {task: self._linear(task, comm_sms) for task in self.coefficients
                if comm_sms > 0 or task not in COMM_TASKS}

    @classmethod
    def fit(cls, samples: Iterable[Sample], total_sms: int) -> "CostModel":
        """Least squares per task over its samples; negative coefficients are clamped to 0
        (a time never shrinks with more tokens). Needs >= 3 samples of each task it models,
        of at least 2 sizes."""
        by_task: dict[str, list[Sample]] = {}
        for s in samples:
            _features(s.task, s.tokens, s.comm_sms, total_sms)  # names and budgets checked
            by_task.setdefault(s.task, []).append(s)
        coefficients = {}
        for task, rows in by_task.items():
            if len(rows) < 3 or len({r.tokens for r in rows}) < 2:
                raise ValueError(f"{task}: {len(rows)} samples of {len({r.tokens for r in rows})}"
                                 " sizes; fitting needs at least 3 samples of 2 sizes (vary "
                                 "tokens and comm_sms)")
            if task in COMM_TASKS:
                coefficients[task] = _least_squares(rows, total_sms)
            else:
                coefficients[task] = _fit_with_floor(rows, total_sms)
        return cls(total_sms, coefficients)

    def relative_errors(self, samples: Iterable[Sample]) -> list[float]:
        """(predicted - measured) / measured for each sample."""
        return [(self.time(s.task, s.tokens, s.comm_sms) - s.us) / s.us for s in samples]

    def to_json(self) -> str:
        return json.dumps({"version": JSON_VERSION, "total_sms": self.total_sms,
                           "coefficients": self.coefficients})

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        data = json.loads(text)
        coefficients = {k: tuple(float(c) for c in v) for k, v in data["coefficients"].items()}
        if data.get("version", 1) == 1:  # fixed + n * c1 * G / (G - s) == interference c1
            coefficients = {k: v if k in COMM_TASKS else (v[0], v[1], v[1], 0.0)
                            for k, v in coefficients.items()}
        return cls(int(data["total_sms"]), coefficients)

    def __str__(self) -> str:
        g = self.total_sms
        lines = [f"CostModel over {g} SMs (us; n = tokens per rank, s = comm SMs, 0 = alone)"]
        for task, c in sorted(self.coefficients.items()):
            if task in COMM_TASKS:
                lines.append(f"  {task:<9} = {c[0]:.3g} + {c[3]:.4g} / s + n * ({c[1]:.4g} / s "
                             f"+ {c[2]:.4g})")
                continue
            ideal = c[2] / c[1] if c[1] > 0 else float("nan")
            lines.append(f"  {task:<9} = {c[0]:.3g} + max({c[3]:.3g}, n * ({c[1]:.4g} + "
                         f"{c[2]:.4g} * s / ({g} - s)))   [interference {ideal:.2f}x the "
                         "ideal G/(G-s)]")
        return "\n".join(lines)


def _least_squares(rows: list, total_sms: int) -> tuple:
    a = torch.tensor([_features(r.task, r.tokens, r.comm_sms, total_sms) for r in rows],
                     dtype=torch.float64)
    b = torch.tensor([[r.us] for r in rows], dtype=torch.float64)
    used = a.abs().sum(0) > 0  # e.g. compute tasks measured alone only: no interference term
    solution = torch.zeros(a.size(1), dtype=torch.float64)
    solution[used] = torch.linalg.lstsq(a[:, used], b).solution.flatten()
    return tuple(max(0.0, float(c)) for c in solution)


def _fit_with_floor(rows: list, total_sms: int) -> tuple:
    """(fixed, per-token, interference, floor): the linear terms from the samples above a
    knee, the floor from those at or below it (their mean above `fixed`), the knee the one
    of least squared relative error over all samples (no floor among the candidates)."""
    sizes = sorted({r.tokens for r in rows})
    best = None
    for knee in [0] + sizes[:-2]:  # keep >= 2 sizes above the knee
        above = [r for r in rows if r.tokens > knee]
        fixed, slope, beside = _least_squares(above, total_sms)
        flat = [r.us - fixed for r in rows if r.tokens <= knee]
        floor = max(0.0, sum(flat) / len(flat)) if flat else 0.0
        candidate = (fixed, slope, beside, floor)
        model = CostModel(total_sms, {"experts": candidate})
        error = sum(e * e for e in model.relative_errors(r._replace(task="experts")
                                                         for r in rows))
        if best is None or error < best[0] - 1e-12:
            best = (error, candidate)
    return best[1]
