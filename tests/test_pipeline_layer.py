"""The pipelined MoE layer equals the unpipelined one for the same routing, on the CPU backend
over gloo, for several chunkings, both compute orders, with and without a shared expert, and
for both schedules (throughput, low latency).

Bit for bit when the experts compute each row on its own (row_wise=True: what dispatch, combine
and the pipeline do to a token does not depend on its chunk); with the real grouped GEMMs the
CPU's BLAS blocks a chunk's rows differently from the whole batch's, so there the outputs agree
to float32 rounding (a few ulp)."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

import torch_swiftep as ts
from torch_swiftep.launch import run_world
from torch_swiftep.moe import ExpertParallelMoE
from torch_swiftep.pipeline import Schedule
from torch_swiftep.pipeline.layer import PipelinedMoE

pytestmark = pytest.mark.slow
E, H, K, FFN, N = 8, 32, 2, 48, 29
CHUNKINGS = ((N,), (10, 10, 9), (3, 17, 1, 8), (1,) * 5 + (24,))


def _layer(rank, world, low_latency):
    torch.manual_seed(0)
    cfg = ts.CommConfig(num_experts=E, hidden=H, num_topk=K, max_tokens_per_rank=N,
                        ll_max_tokens_per_rank=N, dtype=torch.float32)
    comms = [ts.Communicator(dist.group.WORLD, cfg) for _ in range(2)]
    moe = ExpertParallelMoE(comms[0], FFN, low_latency=low_latency, dtype=torch.float32)
    shared = nn.Linear(H, H, bias=False)
    with torch.no_grad():
        shared.weight.copy_(torch.randn(H, H, generator=torch.Generator().manual_seed(1)) / H)
    return moe, comms, shared


def _compare(rank, world, low_latency, row_wise, bound_rows=True):
    moe, comms, shared = _layer(rank, world, low_latency)
    if row_wise:  # an expert that computes every row by itself: bit-exact comparisons
        moe.experts = lambda rows, offs, pool=None: rows * 1.5 - 0.25
        moe.experts_low_latency = lambda rows, out=None: rows * 1.5 - 0.25
        shared = lambda x: x * 0.5  # noqa: E731
    x = torch.randn(N, H, generator=torch.Generator().manual_seed(10 + rank))
    with torch.no_grad():
        plain = moe(x)
        plain_shared = plain + shared(x)
        errors = []
        for with_shared in (False, True):
            layer = PipelinedMoE(moe, comms, shared if with_shared else None,
                                 bound_rows=bound_rows)
            for chunks in CHUNKINGS:
                for order in ("shared_first", "interleaved"):
                    y = layer(x, Schedule(chunks, 4, order, 0.0, ()))
                    want = plain_shared if with_shared else plain
                    same = torch.equal(y, want) if row_wise else \
                        torch.allclose(y, want, rtol=1e-5, atol=1e-6)
                    if not same:
                        err = (y - want).abs().max().item()
                        errors.append(f"rank {rank} shared={with_shared} {chunks} {order}: "
                                      f"max |diff| {err:.3g}")
    return errors


@pytest.mark.parametrize("row_wise", [True, False])
@pytest.mark.parametrize("low_latency", [False, True])
def test_pipelined_layer_equals_the_unpipelined_one(low_latency, row_wise):
    errors = sum(run_world(2, _compare, low_latency, row_wise, timeout_s=120), [])
    assert not errors, errors[:6]


def test_the_whole_window_path_equals_it_too():
    """bound_rows=False: the experts over the whole window (ExpertParallelMoE.experts as is)
    and the combine staging their output, as before the rows were bounded per chunk."""
    errors = sum(run_world(2, _compare, False, True, False, timeout_s=120), [])
    assert not errors, errors[:6]


def _bad_schedule(rank, world):
    moe, comms, _ = _layer(rank, world, False)
    layer = PipelinedMoE(moe, comms)
    try:
        layer(torch.randn(N, H), Schedule((10, 10), 4, "interleaved", 0.0, ()))
    except ValueError as exc:
        return str(exc)
    return "accepted"


def test_a_schedule_that_does_not_cover_the_batch_is_refused():
    for msg in run_world(2, _bad_schedule, timeout_s=120):
        assert "schedule.chunks=[10, 10] must be positive and sum to the batch's 29 tokens" in msg


def test_pipeline_benchmark_runs_on_cpu(tmp_path):
    """The GPU benchmark's code path, on CPU at a tiny shape: its figures mean nothing here."""
    import json

    from torch_swiftep.bench.pipeline_layer import run

    result = run("tiny", 48, out_dir=tmp_path, device=torch.device("cpu"))
    saved = json.loads((tmp_path / "pipeline_layer.json").read_text())
    assert saved["tokens"] == 48 and sum(saved["chosen"]["chunks"]) == 48
    assert result["speedup"] > 0 and 0 <= result["exposed_comm_fraction"] <= 1


def test_sm_carveout_sets_and_restores_the_setting(monkeypatch):
    from torch_swiftep.pipeline import carveout

    values = [None]
    monkeypatch.setattr(carveout, "_SET", values.append)
    monkeypatch.setattr(carveout, "_GET", lambda: values[-1])
    monkeypatch.setattr(carveout, "carveout_supported", lambda: True)
    with carveout.sm_carveout(16):
        assert values[-1] == 16
    with pytest.raises(RuntimeError):
        with carveout.sm_carveout(8):
            raise RuntimeError("a failing GEMM")
    with carveout.sm_carveout(0):  # nothing carved out: the setting is not touched
        pass
    assert values == [None, 16, None, 8, None]


def test_world_of_one_runs_the_experts_over_each_chunks_rows():
    cfg = ts.CommConfig(num_experts=E, hidden=H, num_topk=K, max_tokens_per_rank=N,
                        dtype=torch.float32)
    comms = [ts.Communicator(None, cfg, device=torch.device("cpu")) for _ in range(2)]
    moe = ExpertParallelMoE(comms[0], FFN, dtype=torch.float32)
    layer = PipelinedMoE(moe, comms)
    assert layer.bound_rows and layer.row_bound(N) == N * K  # exact in a world of one
    x = torch.randn(N, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        idx, w = moe.route(x)
        handle = comms[0].dispatch(x, idx, w)
        out = layer.expert_outputs(0, handle, N)
        assert out.data_ptr() == comms[0].combine_buffer().data_ptr()  # combine copies nothing
        with pytest.raises(RuntimeError, match="more rows than its bound"):
            layer.expert_outputs(0, handle, N // 4)
        y = layer(x, Schedule((10, 12, 7), 4, "interleaved", 0.0, ()))
        assert torch.allclose(y, moe(x), rtol=1e-5, atol=1e-6)


EXPERT_GROUPS = ((4,), (2, 2), (1, 3), (3, 1), (1, 1, 1, 1))  # of a rank's 4 local experts


def _compare_expert_chunks(rank, world, row_wise):
    moe, comms, shared = _layer(rank, world, False)
    if row_wise:
        moe.experts = lambda rows, offs, pool=None: rows * 1.5 - 0.25
        shared = lambda x: x * 0.5  # noqa: E731
    x = torch.randn(N, H, generator=torch.Generator().manual_seed(20 + rank))
    errors = []
    with torch.no_grad():
        plain = moe(x)
        for with_shared in (False, True):
            layer = PipelinedMoE(moe, comms, shared if with_shared else None)
            want = plain + shared(x) if with_shared else plain
            for groups in EXPERT_GROUPS:
                y = layer(x, Schedule(groups, 4, "shared_first", 0.0, (), "experts"))
                # one group: the unpipelined layer's calls exactly; more: float32 rounding
                same = torch.equal(y, want) if len(groups) == 1 else \
                    torch.allclose(y, want, rtol=1e-5, atol=1e-6)
                if not same:
                    errors.append(f"rank {rank} shared={with_shared} groups {groups}: max |diff|"
                                  f" {(y - want).abs().max().item():.3g}")
    return errors


@pytest.mark.parametrize("row_wise", [True, False])
def test_chunks_of_experts_equal_the_unpipelined_layer_to_rounding(row_wise):
    errors = sum(run_world(2, _compare_expert_chunks, row_wise, timeout_s=120), [])
    assert not errors, errors[:6]


def _bad_expert_chunks(rank, world):
    messages = []
    for low_latency, groups in ((False, (2, 1)), (True, (2, 2))):
        moe, comms, _ = _layer(rank, world, low_latency)
        layer = PipelinedMoE(moe, comms)
        try:
            layer(torch.randn(N, H), Schedule(groups, 4, "shared_first", 0.0, (), "experts"))
            messages.append("accepted")
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def test_bad_chunks_of_experts_are_refused():
    for uneven, low_latency in run_world(2, _bad_expert_chunks, timeout_s=120):
        assert "schedule.chunks=[2, 1] (chunks of experts) must be positive and sum to the " \
               "rank's 4 local experts" in uneven
        assert "chunks of experts need the throughput schedule" in low_latency
    with pytest.raises(ValueError, match="order must be 'shared_first'"):
        Schedule((2, 2), 4, "interleaved", 0.0, (), "experts")
    with pytest.raises(ValueError, match="split must be one of"):
        Schedule((2, 2), 4, "shared_first", 0.0, (), "rows")


@pytest.mark.parametrize("split", ["tokens", "experts"])
def test_calibration_samples_every_task_size_and_budget_in_a_world_of_one(split):
    # calibrate.measure with its own clock (the multi-process benchmark's clock is tested there)
    from torch_swiftep.bench.pipeline_layer import build
    from torch_swiftep.pipeline import CostModel, calibrate

    torch.manual_seed(0)
    moe, comms, shared, x = build("tiny", 24, torch.device("cpu"))
    layer = PipelinedMoE(moe, comms, shared)
    sizes = [6, 12, 24] if split == "tokens" else [1, 2, 4]  # three: what a fit needs
    with torch.no_grad():
        samples, coverage = calibrate.measure(layer, x, sizes, [4, 8], iters=1, split=split)
    keys = {(s.task, s.tokens, s.comm_sms) for s in samples}
    local = moe.comm.num_local_experts  # a group of g experts stands for its share of tokens
    tokens = sizes if split == "tokens" else [max(1, round(24 * g / local)) for g in sizes]
    for n in tokens:
        for s in (4, 8):
            assert {("dispatch", n, s), ("combine", n, s), ("experts", n, s),
                    ("shared", n, s)} <= keys
        assert {("experts", n, 0), ("shared", n, 0)} <= keys
        assert (("merge", n, 0) in keys) == (split == "experts")
    assert len(samples) == len(keys) and all(s.us > 0 for s in samples)
    assert {(task, s) for task, _, s, _ in coverage} == {(t, s) for t in ("experts", "shared")
                                                          for s in (4, 8)}
    assert CostModel.fit(samples, 132).has("experts")
