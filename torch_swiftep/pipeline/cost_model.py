"""Cost model of one MoE layer's tasks, fitted from measured times (FinDEP's scheduling input).

Each task's time, in microseconds, for `tokens` tokens per rank when the communication kernels
get `comm_sms` of the GPU's `total_sms` SMs and the GEMMs the rest:

    dispatch, combine:  fixed + tokens * (per_token_sm / comm_sms + per_token)
                        (per-SM work, the schedule's SM-bound term, plus a link-bound term)
    experts, shared:    fixed + tokens * per_token * total_sms / (total_sms - comm_sms)
                        (grouped GEMMs on the SMs communication leaves them)
    attention:          as experts (optional: a layer's attention when the caller gives it)

Every model is linear in its coefficients, so `fit` is a least-squares solve over measured
samples. The object prints as a table, round-trips through JSON (the layer caches it), and
`relative_errors` says how well it predicts the samples it was fitted on or any others.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable, NamedTuple

import torch

COMM_TASKS = ("dispatch", "combine")
COMPUTE_TASKS = ("experts", "shared", "attention")
TASKS = COMM_TASKS + COMPUTE_TASKS


class Sample(NamedTuple):
    """One measured task time: task name, tokens per rank, SMs given to communication, us."""

    task: str
    tokens: int
    comm_sms: int
    us: float


def _features(task: str, tokens: float, comm_sms: int, total_sms: int) -> tuple:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not 0 < comm_sms < total_sms:
        raise ValueError(f"comm_sms must be in (0, total_sms={total_sms}), got {comm_sms}")
    if task in COMM_TASKS:
        return (1.0, tokens / comm_sms, float(tokens))
    return (1.0, tokens * total_sms / (total_sms - comm_sms), 0.0)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Coefficients per task: (fixed us, per-token-per-SM or per-token us, per-token us)."""

    total_sms: int
    coefficients: dict  # task -> (c0, c1, c2); see the module docstring

    def time(self, task: str, tokens: float, comm_sms: int) -> float:
        """Predicted microseconds of `task` over `tokens` tokens per rank (0 tokens: 0 us)."""
        if tokens <= 0:
            return 0.0
        if task not in self.coefficients:
            raise KeyError(f"the cost model has no {task!r} task (it has "
                           f"{sorted(self.coefficients)}): fit it with samples of that task")
        f = _features(task, tokens, comm_sms, self.total_sms)
        return sum(c * x for c, x in zip(self.coefficients[task], f))

    def has(self, task: str) -> bool:
        return task in self.coefficients

    def linear(self, comm_sms: int) -> dict:
        """task -> (fixed us, us per token) at this SM budget: time = fixed + tokens * slope
        (for tokens > 0). The solver's inner loop uses it."""
        out = {}
        for task, coefficients in self.coefficients.items():
            f = _features(task, 1.0, comm_sms, self.total_sms)
            out[task] = (coefficients[0], sum(c * x for c, x in zip(coefficients[1:], f[1:])))
        return out

    @classmethod
    def fit(cls, samples: Iterable[Sample], total_sms: int) -> "CostModel":
        """Least squares per task over its samples; negative coefficients are clamped to 0
        (a time never shrinks with more tokens). Needs >= 3 samples of each task it models."""
        by_task: dict[str, list[Sample]] = {}
        for s in samples:
            by_task.setdefault(s.task, []).append(s)
        coefficients = {}
        for task, rows in by_task.items():
            if len(rows) < 3:
                raise ValueError(f"{task}: {len(rows)} samples; fitting needs at least 3 (vary "
                                 "tokens and comm_sms)")
            a = torch.tensor([_features(task, r.tokens, r.comm_sms, total_sms) for r in rows],
                             dtype=torch.float64)
            b = torch.tensor([[r.us] for r in rows], dtype=torch.float64)
            used = a.abs().sum(0) > 0  # compute tasks have no third feature
            solution = torch.zeros(3, dtype=torch.float64)
            solution[used] = torch.linalg.lstsq(a[:, used], b).solution.flatten()
            coefficients[task] = tuple(max(0.0, float(c)) for c in solution)
        return cls(total_sms, coefficients)

    def relative_errors(self, samples: Iterable[Sample]) -> list[float]:
        """(predicted - measured) / measured for each sample."""
        return [(self.time(s.task, s.tokens, s.comm_sms) - s.us) / s.us for s in samples]

    def to_json(self) -> str:
        return json.dumps({"total_sms": self.total_sms, "coefficients": self.coefficients})

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        data = json.loads(text)
        return cls(int(data["total_sms"]),
                   {k: tuple(float(c) for c in v) for k, v in data["coefficients"].items()})

    def __str__(self) -> str:
        lines = [f"CostModel over {self.total_sms} SMs (us; n = tokens per rank, s = comm SMs)"]
        for task, (c0, c1, c2) in sorted(self.coefficients.items()):
            if task in COMM_TASKS:
                lines.append(f"  {task:<9} = {c0:.3g} + n * ({c1:.4g} / s + {c2:.4g})")
            else:
                lines.append(f"  {task:<9} = {c0:.3g} + n * {c1:.4g} * {self.total_sms} / "
                             f"({self.total_sms} - s)")
        return "\n".join(lines)
