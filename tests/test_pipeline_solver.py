"""The FinDEP cost model and solver (torch_swiftep.pipeline): fitting, the timeline model and
the solver against exhaustive search on small instances."""
import itertools
import json
import random

import pytest

from torch_swiftep.pipeline import CostModel, Sample, equal_chunks, simulate, solve
from torch_swiftep.pipeline.schedule import ORDERS, compute_sms, linear_for, makespan

TOTAL_SMS = 132
SMS = (2, 4, 8, 16)


def _model(rng: random.Random, floors: bool = True) -> CostModel:
    def compute(fixed, per_token, floor):
        # interference around the ideal G / (G - s) (per_token), a roofline floor or none
        return (fixed, per_token, per_token * rng.uniform(0.5, 2.0),
                floor if floors and rng.random() < 0.7 else 0.0)
    return CostModel(TOTAL_SMS, {
        "dispatch": (rng.uniform(5, 40), rng.uniform(0.5, 4), rng.uniform(0, 0.1),
                     rng.uniform(0, 2000)),
        "combine": (rng.uniform(5, 40), rng.uniform(1, 8), rng.uniform(0, 0.1),
                    rng.uniform(0, 4000)),
        "experts": compute(rng.uniform(10, 80), rng.uniform(0.2, 3), rng.uniform(50, 400)),
        "shared": compute(rng.uniform(5, 20), rng.uniform(0.05, 0.5), rng.uniform(5, 40)),
    })


def _samples(truth: CostModel, sizes=(128, 512, 4096), budgets=(4, 8, 24)) -> list:
    return [Sample(task, n, s, truth.time(task, n, s))
            for task in ("dispatch", "combine", "experts", "shared") for n in sizes
            for s in budgets + ((0,) if task in ("experts", "shared") else ())]


def test_fit_recovers_the_coefficients_and_predicts_its_samples():
    truth = _model(random.Random(1), floors=False)
    samples = _samples(truth)
    fitted = CostModel.fit(samples, TOTAL_SMS)
    for task, want in truth.coefficients.items():
        assert fitted.coefficients[task] == pytest.approx(want, rel=1e-6, abs=1e-9), task
    assert max(abs(e) for e in fitted.relative_errors(samples)) < 1e-9
    assert CostModel.from_json(fitted.to_json()) == fitted
    assert "dispatch" in str(fitted) and "132" in str(fitted)


def test_fit_finds_the_floor_of_small_chunks():
    """Chunks too small to be compute-bound cost the weights' streaming time whatever their
    size: the fit puts the small samples on a floor instead of inflating the fixed cost."""
    truth = CostModel(TOTAL_SMS, {"experts": (30.0, 0.9, 1.1, 600.0)})
    samples = [Sample("experts", n, s, truth.time("experts", n, s))
               for n in (64, 128, 256, 1024, 2048, 4096) for s in (0, 8, 16)]
    fitted = CostModel.fit(samples, TOTAL_SMS)
    assert fitted.coefficients["experts"] == pytest.approx((30.0, 0.9, 1.1, 600.0), rel=1e-6)
    linear_only = CostModel.fit([s for s in samples if s.tokens >= 1024], TOTAL_SMS)
    assert linear_only.coefficients["experts"][3] == 0.0


def test_interference_is_the_ideal_one_when_beside_equals_alone_rate():
    m = CostModel(TOTAL_SMS, {"experts": (10.0, 2.0, 2.0, 0.0)})
    for s in (4, 16, 32):  # fixed + n * b * G / (G - s)
        assert m.time("experts", 1000, s) == pytest.approx(10 + 2000 * TOTAL_SMS / (TOTAL_SMS - s))
    assert m.time("experts", 1000, 0) == pytest.approx(2010.0)


def test_version_1_json_keeps_its_meaning():
    old = json.dumps({"total_sms": TOTAL_SMS, "coefficients": {
        "dispatch": [40.0, 2.0, 0.0], "experts": [960.0, 0.9, 0.0]}})
    m = CostModel.from_json(old)
    assert m.coefficients["experts"] == (960.0, 0.9, 0.9, 0.0)
    assert m.time("experts", 100, 16) == pytest.approx(960 + 90 * TOTAL_SMS / (TOTAL_SMS - 16))


def test_fit_needs_enough_samples_and_known_tasks():
    with pytest.raises(ValueError, match="needs at least 3"):
        CostModel.fit([Sample("dispatch", 10, 4, 1.0)], TOTAL_SMS)
    with pytest.raises(ValueError, match="task must be one of"):
        CostModel.fit([Sample("gemm", n, 4, 1.0) for n in (1, 2, 3)], TOTAL_SMS)
    with pytest.raises(ValueError, match="comm_sms must be in"):
        CostModel.fit([Sample("dispatch", n, 0, 1.0) for n in (1, 2, 3)], TOTAL_SMS)


def test_one_chunk_is_the_serial_layer():
    """One chunk: the experts run after the dispatch, on the whole GPU; the shared expert
    runs beside the dispatch, on what communication leaves."""
    m = _model(random.Random(2))
    t = {task: m.time(task, 1000, 8) for task in m.coefficients}
    alone = m.time("experts", 1000, 0)
    assert compute_sms("experts", 1, 8) == 0 and compute_sms("experts", 2, 8) == 8
    got, timeline = simulate(m, [1000], 8, "shared_first", shared=True)
    assert got == pytest.approx(max(t["dispatch"], t["shared"]) + alone + t["combine"])
    assert [task.name for task in timeline if task.stream == "comm"] == ["dispatch", "combine"]


def test_fast_makespan_equals_the_timeline():
    rng = random.Random(3)
    for _ in range(300):
        m = _model(rng)
        chunks = [rng.randint(1, 400) for _ in range(rng.randint(1, 7))]
        s, order, shared = rng.choice(SMS), rng.choice(ORDERS), rng.random() < 0.5
        assert makespan(linear_for(m, s, len(chunks)), chunks, order, shared) == \
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
                    best = min(best, makespan(linear_for(m, s, k), chunks, order, shared))
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


@pytest.mark.parametrize("seed", range(6))
def test_chunks_of_experts_are_within_5_percent_of_exhaustive_search(seed):
    """split="experts": chunks are groups of a rank's 12 local experts, each standing for
    tokens / 12 tokens in the model; the shared expert (if any) first over the whole batch."""
    rng = random.Random(200 + seed)
    m, shared, tokens, local = _model(rng), seed % 2 == 0, 4096, 12
    best = float("inf")
    for k in range(1, 6):
        for cuts in itertools.combinations(range(1, local), k - 1):
            bounds = (0,) + cuts + (local,)
            work = [(b - a) * tokens / local for a, b in zip(bounds, bounds[1:])]
            for s in SMS:
                best = min(best, makespan(linear_for(m, s, k), work, "shared_first", shared))
    got = solve(m, tokens, shared=shared, sms_options=SMS, max_chunks=5, split="experts",
                local_experts=local)
    assert sum(got.chunks) == local and got.split == "experts"
    assert got.order == "shared_first" and got.work[0] == got.chunks[0] * tokens / local
    assert got.predicted_us <= 1.05 * best, (got.explain(), best)
    assert got.predicted_us == pytest.approx(simulate(m, got.work, got.comm_sms, got.order,
                                                      shared)[0])
    assert "chunks of local experts" in got.explain()
    with pytest.raises(ValueError, match="needs local_experts"):
        solve(m, tokens, split="experts")


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


def test_a_model_fitted_on_two_gpus_moves_its_link_terms_to_eight(capsys, tmp_path):
    from torch_swiftep.pipeline.__main__ import main, moved_to_world

    fitted = CostModel(132, {"dispatch": (10.0, 1.0, 0.2), "combine": (20.0, 2.0, 0.1),
                             "experts": (500.0, 1.0, 1.0, 50.0)})
    path = tmp_path / "pipeline_multi_process.json"
    path.write_text(json.dumps(dict(world=2, cost_model_json=fitted.to_json())))
    moved = moved_to_world(path, 8)
    assert moved.coefficients["dispatch"] == pytest.approx((10.0, 1.0, 0.2 * 1.75, 0.0))
    assert moved.coefficients["combine"] == pytest.approx((20.0, 2.0, 0.1 * 1.75, 0.0))
    assert moved.coefficients["experts"] == fitted.coefficients["experts"]
    with pytest.raises(ValueError, match="2\\+ ranks"):
        moved_to_world(path, 1)
    assert main(["--measured", str(path), "--to-world", "8", "--tokens", "512",
                 "--experts-fixed-us", "20"]) == 0
    out = capsys.readouterr().out
    assert "FITTED on a GPU per rank" in out and "fixed cost per chunk is 20 us" in out


def test_merges_of_chunks_of_experts_are_priced_and_modelled_exactly():
    """With a merge task (chunks of experts: each combine added into a float32 total on the
    compute stream), the fast makespan equals the timeline and the solver pays the merges."""
    rng = random.Random(11)
    base = _model(rng)
    m = CostModel(TOTAL_SMS, dict(base.coefficients, merge=(20.0, 0.05, 0.0, 0.0)))
    for shared in (False, True):
        for work in ([4096.0], [2048.0, 2048.0], [512.0, 1024.0, 1536.0, 1024.0]):
            for s in (4, 16):
                fast = makespan(linear_for(m, s, len(work)), work, "shared_first", shared,
                                len(work) > 1)
                slow, timeline = simulate(m, work, s, "shared_first", shared, "experts")
                assert fast == pytest.approx(slow)
                names = [t.name for t in timeline if t.stream == "compute"]
                assert names.count("merge") == (len(work) if len(work) > 1 else 0)
    free = solve(base, 4096, shared=True, split="experts", local_experts=16)
    priced = solve(m, 4096, shared=True, split="experts", local_experts=16)
    assert priced.predicted_us >= free.predicted_us
    assert len(priced.chunks) <= len(free.chunks)


def test_a_model_fitted_on_chunks_of_experts_is_solved_in_experts(capsys, tmp_path):
    from torch_swiftep.pipeline.__main__ import main

    fitted = CostModel(132, {"dispatch": (10.0, 1.0, 0.2, 500.0),
                             "combine": (20.0, 2.0, 0.1, 900.0),
                             "experts": (20.0, 1.0, 1.0, 50.0), "merge": (0.0, 0.03, 0.0, 0.0)})
    path = tmp_path / "pipeline_multi_process.json"
    path.write_text(json.dumps(dict(world=2, experts=64, split="experts",
                                    cost_model_json=fitted.to_json())))
    assert main(["--measured", str(path), "--to-world", "8", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "chunks of experts" in out and "of local experts [" in out
    chosen = out.split("of local experts [")[1].split("]")[0]
    assert sum(int(c) for c in chosen.split(",")) == 32  # 64 experts over the 2 ranks it ran on
