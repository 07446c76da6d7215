"""The pipelined layer with ranks as processes (python3 -m
torch_swiftep.bench.pipeline_multi_process): the arithmetic of its figures, its command line,
and the whole run on the CPU backend over gloo (world 2, tiny shape): every rank ran the same
schedule and the pipelined layer equalled the unpipelined one before anything was timed."""
import json

import pytest
import torch
import torch.distributed as dist

from torch_swiftep.bench import pipeline_multi_process as pmp
from torch_swiftep.bench.pipeline_layer import build
from torch_swiftep.launch import run_world
from torch_swiftep.pipeline import Sample


def test_carveout_gives_each_rank_its_share_of_the_sms():
    # 8 ranks on 132 SMs: a rank's share is 16; beside 8 communication SMs its GEMMs get 8
    assert pmp.carveout_sms(8, 132, 8) == 124 and 132 - pmp.carveout_sms(8, 132, 8) == 16 - 8
    assert pmp.carveout_sms(0, 132, 8) == 116  # no communication beside: the whole share
    for s in (0, 4, 16):  # a world of one: the layer's own carve-out
        assert pmp.carveout_sms(s, 132, 1) == s
    assert pmp.carveout_sms(8, 132, 8, "comm") == 8 and pmp.carveout_sms(8, 132, 8, "off") == 0
    with pytest.raises(KeyError):
        pmp.carveout_sms(8, 132, 8, "all")


def test_budgets_must_fit_the_gpu_and_leave_the_gemms_sms():
    kept, dropped = pmp.usable_budgets([2, 4, 8, 12, 16, 24], 8, 132)
    assert kept == [2, 4, 8, 12]
    assert any("24 SMs/rank dropped" in m for m in dropped)  # 8 x 24 > 132
    assert any("16 SMs/rank dropped: not below a rank's share of 16" in m for m in dropped)


def test_window_capacity():
    assert pmp.world_capacity(4096, 8, 8, 32) == 49152  # 1.5 x 4096 x 8
    assert pmp.world_capacity(32, 4, 2, 8) == 256  # the worst case is below the 1024 floor
    assert pmp.world_capacity(100, 4, 8, 2) == 1024


@pytest.mark.parametrize("n", [1, 2, 5, 16, 256])
def test_check_chunkings_cover_the_batch_in_two_or_more_chunks(n):
    chunkings = pmp.check_chunkings(n)
    assert len(set(chunkings)) == len(chunkings)
    for chunks in chunkings:
        assert sum(chunks) == n and len(chunks) > 1 and min(chunks) > 0
    assert (len(chunkings) >= 3) == (n >= 5) and (chunkings == []) == (n == 1)


def test_each_sample_takes_its_slowest_rank():
    ranks = [[("dispatch", 64, 4, 10.0), ("experts", 64, 0, 30.0)],
             [("dispatch", 64, 4, 12.0), ("experts", 64, 0, 25.0)]]
    assert pmp.slowest_samples(ranks) == [Sample("dispatch", 64, 4, 12.0),
                                          Sample("experts", 64, 0, 30.0)]
    with pytest.raises(ValueError, match="different samples"):
        pmp.slowest_samples([ranks[0], [("dispatch", 64, 8, 1.0), ("experts", 64, 0, 1.0)]])
    with pytest.raises(ValueError, match="different samples"):
        pmp.slowest_samples([ranks[0], ranks[1][:1]])


def test_summary_figures():
    sweep = {(1, 4): 1000.0, (1, 8): 900.0, (2, 4): 800.0, (2, 8): 700.0, (4, 8): 750.0}
    r = pmp.summarize(sweep, chosen_us=750.0, comm_sms=8, predicted_us=720.0)
    assert (r["serial_us"], r["serial_comm_sms"]) == (900.0, 8)  # the best unpipelined budget
    assert r["sweep_best"] == dict(chunks=2, comm_sms=8, us=700.0)
    assert r["speedup"] == pytest.approx(1.2) and r["speedup_same_sms"] == pytest.approx(1.2)
    assert r["vs_sweep_best"] == pytest.approx(750 / 700)
    assert r["prediction_error"] == pytest.approx(-0.04)
    assert pmp.rounded({"a": [1.23456, 2], "b": 0.000123456}) == {"a": [1.235, 2], "b": 0.0001235}


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        pmp.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--world", "--shape", "--tokens", "--experts", "--device", "--sms",
                 "--check-tokens", "--repeats", "--carveout", "--bound-rows", "--split",
                 "--partials", "--fanout", "--timeout", "--out"):
        assert flag in text
    for flags, message in ((["--world", "3"], "must divide the experts, got --experts 256"),
                           (["--world", "2", "--experts", "63"], "got --experts 63"),
                           (["--tokens", "0"], "--tokens must be positive"),
                           (["--carveout", "all"], "invalid choice")):
        with pytest.raises(SystemExit):
            pmp.main(flags)
        assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: it would run")
def test_cuda_without_a_gpu_runs_nothing(capsys):
    assert pmp.main(["--world", "2"]) == 2
    assert "nothing run" in capsys.readouterr().out


def _checks(rank, world_size, bound_rows, split):
    """_check on a good layer, then on one whose pipelined chunks come out zero."""
    torch.manual_seed(0)
    opts = dict(check_tokens=12, sms=[4], carveout="share", device_sms=132, world=world_size,
                sharing=world_size, bound_rows=bound_rows, split=split)
    moe, comms, shared, x = build("tiny", 24, torch.device("cpu"), dist.group.WORLD,
                                  seed=rank, moe_type=pmp.local_moe, num_experts=16, num_sms=4)
    world = pmp._World(torch.device("cpu"), dict(repeats=1))
    layer = pmp.WorldLayer(moe, comms, shared, opts)
    with torch.no_grad():
        good = pmp._check(layer, x, opts, world)
        run = layer._run
        layer._run = lambda x, parts, s: [p[0] * 0 for p in parts] if len(parts) > 1 else \
            run(x, parts, s)
        bad = pmp._check(layer, x, opts, world)
    return good, bad


@pytest.mark.slow
@pytest.mark.parametrize("bound_rows, split", [(None, "tokens"), (True, "tokens"),
                                               (None, "experts")])
def test_the_check_passes_and_catches_a_broken_pipeline_on_every_rank(bound_rows, split):
    for (good_errors, good), (bad_errors, bad) in run_world(2, _checks, bound_rows, split,
                                                            timeout_s=120):
        assert good_errors == [] and good["tokens"] == 12
        # chunks of experts sum a token's groups apart: rounding, not bits
        assert good["max_rel_diff"] == 0.0 if split == "tokens" else good["max_rel_diff"] < 0.02
        assert bad["max_rel_diff"] == pytest.approx(1.0) and not bad["bit_identical"]
        assert len(bad_errors) == 1 and "real experts: pipelined differs" in bad_errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("split", ["tokens", "experts"])
def test_the_whole_run_on_cpu(tmp_path, capsys, split):
    """The GPU run's code path on the CPU backend: its times mean nothing here."""
    assert pmp.main(["--device", "cpu", "--world", "2", "--shape", "tiny", "--tokens", "32",
                     "--check-tokens", "16", "--repeats", "1", "--out", str(tmp_path),
                     "--split", split]) == 0
    out = capsys.readouterr().out
    assert "check: passed" in out and "chunks  4 SMs/rank  8 SMs/rank" in out
    r = json.loads((tmp_path / "pipeline_multi_process.json").read_text())
    assert r["errors"] == [] and r["schedule_agreed"] and r["world"] == 2
    units = 32 if split == "tokens" else 8  # tokens, or the tiny shape's 16 / 2 local experts
    assert sum(r["chosen"]["chunks"]) == units and r["chosen"]["split"] == split
    assert r["chosen"]["comm_sms"] in (4, 8)
    if split == "tokens":
        assert [c["max_rel_diff"] for c in r["check"]] == [0.0, 0.0]
    assert set(r["sweep"]) == {f"{k}x{s}" for k in (1, 2, 4, 8) for s in (4, 8)}
    for key in ("serial_us", "chosen_us", "predicted_us", "prediction_error", "speedup",
                "vs_sweep_best", "exposed_comm_fraction"):
        assert isinstance(r[key], float), key
    assert 0 <= r["exposed_comm_fraction"] <= 1 and len(r["exposed_by_rank"]) == 2
    assert r["timing"] == ["host clock after a barrier (CPU), slowest rank's median"]
    assert r["cost_model"].startswith("CostModel over 66 SMs") and r["measured_timeline_rank0"]
