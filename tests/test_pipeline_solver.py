"""The FinDEP cost model and solver (torch_swiftep.pipeline): fitting, the timeline model and
the solver against exhaustive search on small instances."""
import itertools
import random

import pytest

from torch_swiftep.pipeline import CostModel, Sample, equal_chunks, simulate, solve
from torch_swiftep.pipeline.schedule import ORDERS, makespan

TOTAL_SMS = 132
SMS = (2, 4, 8, 16)


def _model(rng: random.Random) -> CostModel:
    return CostModel(TOTAL_SMS, {
        "dispatch": (rng.uniform(5, 40), rng.uniform(0.5, 4), rng.uniform(0, 0.1)),
        "combine": (rng.uniform(5, 40), rng.uniform(1, 8), rng.uniform(0, 0.1)),
        "experts": (rng.uniform(10, 80), rng.uniform(0.2, 3), 0.0),
        "shared": (rng.uniform(5, 20), rng.uniform(0.05, 0.5), 0.0),
    })


def test_fit_recovers_the_coefficients_and_predicts_its_samples():
    truth = _model(random.Random(1))
    samples = [Sample(task, n, s, truth.time(task, n, s))
               for task in ("dispatch", "combine", "experts", "shared")
               for n in (128, 512, 4096) for s in (4, 8, 24)]
    fitted = CostModel.fit(samples, TOTAL_SMS)
    for task, want in truth.coefficients.items():
        assert fitted.coefficients[task] == pytest.approx(want, rel=1e-6, abs=1e-9), task
    assert max(abs(e) for e in fitted.relative_errors(samples)) < 1e-9
    assert CostModel.from_json(fitted.to_json()) == fitted
    assert "dispatch" in str(fitted) and "132" in str(fitted)


def test_fit_needs_enough_samples_and_known_tasks():
    with pytest.raises(ValueError, match="needs at least 3"):
        CostModel.fit([Sample("dispatch", 10, 4, 1.0)], TOTAL_SMS)
    with pytest.raises(ValueError, match="task must be one of"):
        CostModel.fit([Sample("gemm", n, 4, 1.0) for n in (1, 2, 3)], TOTAL_SMS)


def test_one_chunk_is_the_serial_layer():
    m = _model(random.Random(2))
    t = {task: m.time(task, 1000, 8) for task in m.coefficients}
    got, timeline = simulate(m, [1000], 8, "shared_first", shared=True)
    assert got == pytest.approx(max(t["dispatch"], t["shared"]) + t["experts"] + t["combine"])
    assert [task.name for task in timeline if task.stream == "comm"] == ["dispatch", "combine"]


def test_fast_makespan_equals_the_timeline():
    rng = random.Random(3)
    for _ in range(200):
        m = _model(rng)
        chunks = [rng.randint(1, 400) for _ in range(rng.randint(1, 7))]
        s, order, shared = rng.choice(SMS), rng.choice(ORDERS), rng.random() < 0.5
        assert makespan(m.linear(s), chunks, order, shared) == \
            pytest.approx(simulate(m, chunks, s, order, shared)[0])


def _exhaustive(m: CostModel, tokens: int, unit: int, max_chunks: int, shared: bool) -> float:
    units = tokens // unit
    best = float("inf")
    for k in range(1, max_chunks + 1):
        for cuts in itertools.combinations(range(1, units), k - 1):
            bounds = (0,) + cuts + (units,)
            chunks = [(b - a) * unit for a, b in zip(bounds, bounds[1:])]
            for s in SMS:
                for order in ORDERS:
                    best = min(best, makespan(m.linear(s), chunks, order, shared))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_solver_is_within_5_percent_of_exhaustive_search(seed):
    rng = random.Random(100 + seed)
    m, shared = _model(rng), seed % 2 == 0
    tokens, unit = 12 * 32, 32
    best = _exhaustive(m, tokens, unit, max_chunks=5, shared=shared)
    got = solve(m, tokens, shared=shared, sms_options=SMS, max_chunks=5, granularity=unit)
    assert sum(got.chunks) == tokens
    assert got.predicted_us <= 1.05 * best, (got.explain(), best)
    assert 0 <= got.exposed_comm_us() <= got.predicted_us


def test_solver_never_loses_to_the_unpipelined_layer_and_explains_itself():
    m = _model(random.Random(7))
    piped = solve(m, 4096, shared=True)
    serial = solve(m, 4096, shared=True, fixed_chunks=1)
    assert piped.predicted_us <= serial.predicted_us
    text = piped.explain()
    assert f"{len(piped.chunks)} chunks" in text and "combine" in text


def test_equal_chunks_cover_the_tokens():
    for tokens in (1, 5, 31, 32, 33, 4096, 4097):
        for k in (1, 2, 3, 8):
            for g in (1, 4, 32):
                chunks = equal_chunks(tokens, k, g)
                assert sum(chunks) == tokens and min(chunks) > 0 and len(chunks) <= k


def test_prediction_cli_fits_the_measured_results(capsys):
    from torch_swiftep.pipeline.__main__ import main

    assert main(["--model", "qwen3-moe", "--tokens", "1024"]) == 0
    out = capsys.readouterr().out
    assert "(measured)" in out and "ASSUMED" in out and "predicted speedup" in out
