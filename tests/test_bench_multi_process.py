"""The multi-process benchmark (python3 -m torch_swiftep.bench.multi_process) on a CPU machine:
its command line, the arithmetic of its figures on synthetic numbers, the peers' "not run"
path, the DeepEP build script's source edits; the GPU run itself is skipped without a GPU."""
import json
import os
import pathlib
import subprocess

import pytest
import torch
from gpu_world import GPU_MARKS

from torch_swiftep.bench import deepep_peer, multi_process
from torch_swiftep.bench.multi_process import main, parser
from torch_swiftep.bench.multi_process_records import (
    HEADERS,
    OPS,
    PEER_OP,
    build_records,
    ceiling_fraction,
    fit_budgets,
    format_report,
    per_rank_ops,
    slowest,
)
from torch_swiftep.bench.rank_timing import chain_slope

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--world", "--tokens", "--hidden", "--topk", "--experts", "--sms",
                 "--check-tokens", "--no-check", "--repeats", "--chain", "--peers", "--timeout",
                 "--out"):
        assert flag in text
    assert "MPS" in text and "slope" in text
    assert "(default: 7168)" in text and "(default: 2,4,8,16)" in text


def test_cli_parses_lists_and_defaults():
    args = parser().parse_args([])
    assert (args.world, args.tokens, args.hidden, args.topk, args.experts) == (8, 4096, 7168, 8,
                                                                               256)
    assert args.sms == [2, 4, 8, 16] and args.peers == ["deepep", "torch"]
    assert args.chain == [multi_process.SHORT, multi_process.LONG] and args.check_tokens == 256
    args = parser().parse_args(["--sms", "4, 8", "--peers", "none", "--chain", "3,9",
                                "--out", "d"])
    assert args.sms == [4, 8] and args.peers == [] and args.chain == [3, 9] and args.out == "d"
    assert parser().parse_args(["--peers", "deepep"]).peers == ["deepep"]


@pytest.mark.parametrize("flags, message", [
    (["--sms", "0,4"], "expected positive integers"),
    (["--sms", "a"], "expected positive integers"),
    (["--peers", "nccl"], "peers are deepep, torch or none"),
    (["--tokens", "0"], "--tokens must be positive"),
    (["--experts", "100"], "must split evenly over --world"),
    (["--world", "1", "--experts", "8"], "must split evenly over --world"),
    (["--chain", "9,3"], "SHORT < LONG"),
])
def test_cli_refuses_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_chain_slope_cancels_the_start_skew():
    """Chains of 2 and 10 calls of 1.5 ms each, started 0.7 ms late (a rank waiting for the
    slowest peer's host): the slope is the call, whatever the skew."""
    call, skew = 1.5, 0.7
    assert chain_slope(skew + 2 * call, skew + 10 * call, 2, 10) == pytest.approx(call)
    assert chain_slope(2 * call, 10 * call) == pytest.approx(call)  # SHORT, LONG defaults
    with pytest.raises(ValueError):
        chain_slope(1.0, 2.0, 5, 5)


def test_per_rank_ops_and_the_slowest_rank():
    ranks = [per_rank_ops(dict(dispatch=2.0, pair=7.0, pair_own=9.5, pair_copy=7.5,
                               pair_sym=7.25)),
             per_rank_ops(dict(dispatch=2.5, pair=7.0, pair_own=9.0, pair_copy=8.5,
                               pair_sym=7.0))]
    assert ranks[0] == {"dispatch": 2.0, "combine": 5.0, "combine, own tensor": 7.5,
                        "combine, torch copy": 5.5, "combine, symmetric pool": 5.25,
                        "step, own tensor": 9.5, "step, symmetric pool": 7.25}
    assert set(ranks[0]) == set(OPS) == set(PEER_OP)
    # per op the slowest rank, each op on its own
    assert slowest(ranks) == {"dispatch": 2.5, "combine": 5.0, "combine, own tensor": 7.5,
                              "combine, torch copy": 6.0, "combine, symmetric pool": 5.25,
                              "step, own tensor": 9.5, "step, symmetric pool": 7.25}


def test_ceiling_fraction_counts_read_and_write():
    # 3 GB of least traffic in 2 ms = 1500 GB/s; the copy moves 1000 GB/s of payload = 2000 GB/s
    # of read + write traffic
    assert ceiling_fraction(3e9, 2.0, 1000.0) == pytest.approx(0.75)
    assert ceiling_fraction(3e9, 2.0, None) is None


def _records(peers):
    swiftep = {4: {"dispatch": 2.0, "combine": 4.0, "combine, own tensor": 8.0,
                   "combine, torch copy": 5.0, "combine, symmetric pool": 4.8,
                   "step, own tensor": 10.0, "step, symmetric pool": 6.0},
               8: {"dispatch": 1.0, "combine": 2.0, "combine, own tensor": 4.0,
                   "combine, torch copy": 2.5, "combine, symmetric pool": 2.4,
                   "step, own tensor": 5.0, "step, symmetric pool": 3.0}}
    world_bytes = dict(pairs_per_rank=1000.0, dispatch=4e9, combine=6e9)
    return build_records(swiftep, world_bytes, {32: 1000.0}, 8, 500, peers)


def test_records_arithmetic():
    deepep = {"status": "ran", "by_sms": {4: {"dispatch": 3.0, "combine": 6.0, "step": 9.0}}}
    records = _records({"deepep": deepep})
    assert [(r["op"], r["sms_per_rank"]) for r in records][:7] == [
        ("dispatch", 4), ("combine", 4), ("combine, own tensor", 4), ("combine, torch copy", 4),
        ("combine, symmetric pool", 4), ("step, own tensor", 4), ("step, symmetric pool", 4)]
    d4, c4, own4, copy4, sym4, step4, step_sym4 = records[:7]
    at8 = records[7]
    assert (at8["op"], at8["sms_per_rank"]) == ("dispatch", 8)
    # algbw: 1000 pairs x 500 channels x 2 bytes = 1 MB per rank; in 2 ms: 0.5 GB/s
    assert d4["algbw_gbps"] == pytest.approx(0.5)
    assert step4["algbw_gbps"] == pytest.approx(2 * 1e6 / 10e-3 / 1e9)  # both directions
    assert d4["sms_total"] == 32 and d4["least_bytes"] == 4e9
    assert d4["ceiling_fraction"] == pytest.approx(4e9 / 2e-3 / 1e9 / 2000)
    assert step4["least_bytes"] == step_sym4["least_bytes"] == 10e9
    assert sym4["least_bytes"] == c4["least_bytes"] == 6e9  # a combine's bytes, as DeepEP's
    assert step_sym4["algbw_gbps"] == pytest.approx(2 * 1e6 / 6e-3 / 1e9)
    assert at8["ceiling_fraction"] is None  # no ceiling at 64 SMs
    # each op beside the peer's figure of the same kind, as peer ms / swiftep ms
    assert d4["peers"]["deepep"] == dict(ms=3.0, speedup=1.5)
    assert c4["peers"]["deepep"]["speedup"] == pytest.approx(1.5)
    assert own4["peers"]["deepep"]["speedup"] == pytest.approx(0.75)
    assert copy4["peers"]["deepep"]["speedup"] == pytest.approx(1.2)
    assert step4["peers"]["deepep"]["speedup"] == pytest.approx(0.9)
    assert sym4["peers"]["deepep"]["speedup"] == pytest.approx(1.25)  # vs DeepEP's combine
    assert step_sym4["peers"]["deepep"]["speedup"] == pytest.approx(1.5)  # vs DeepEP's step
    assert at8["peers"] == {}  # DeepEP has no 8-SM figure


def test_report_table_and_peer_lines():
    deepep = {"status": "ran", "timing": "chained CUDA graphs", "sm_budget": "per rank",
              "notes": ["16 SMs/rank: failed"], "by_sms": {4: {"dispatch": 3.0}}}
    torch_peer = {"status": "not run: too many experts"}
    text = format_report(_records({"deepep": deepep, "torch": torch_peer}),
                         {"deepep": deepep, "torch": torch_peer})
    header = text.splitlines()[0]
    for column in HEADERS:
        assert column in header
    assert "torch a2a ms" not in header  # torch did not run: no columns for it
    first = text.splitlines()[2]  # dispatch at 4 SMs/rank: 4 GB in 2 ms, copy 2000 GB/s
    assert first.split()[:3] == ["dispatch", "4", "32"] and "100%" in first and "1.50x" in first
    assert "deepep: ran; timing: chained CUDA graphs; sm budget: per rank" in text
    assert "  16 SMs/rank: failed" in text and "torch: not run: too many experts" in text
    ran = {"status": "ran", "by_sms": {4: {"dispatch": 1.0}, 8: {"dispatch": 1.0}}}
    header = format_report(_records({"torch": ran}), {"torch": ran}).splitlines()[0]
    assert "torch a2a ms" in header and "vs torch" in header


def test_world_aggregation_and_json(monkeypatch, tmp_path):
    """The parent's side with the ranks faked: per rank slopes -> per op the slowest rank; the
    routing's bytes summed over the world; the JSON written."""
    from torch_swiftep import launch
    from torch_swiftep.bench.metrics import RoutingBytes

    def rank(d, pair, own, pairs):
        slopes = {name: {"slope_ms": v} for name, v in
                  (("dispatch", d), ("pair", pair), ("pair_own", own), ("pair_copy", pair + 1),
                   ("pair_sym", pair + 0.5))}
        routing = RoutingBytes(token_rank_pairs=pairs, rows=2 * pairs, tokens_sent=pairs // 2,
                               num_tokens=pairs // 2, remote_rows=pairs, remote_pairs=pairs // 4)
        return dict(errors=[], routing=routing.__dict__, slopes={4: slopes})

    fake = [rank(2.0, 6.0, 9.0, 100), rank(2.2, 6.0, 8.0, 300)]
    monkeypatch.setattr(launch, "run_world", lambda *a, **k: fake)
    args = parser().parse_args(["--world", "2", "--experts", "4", "--hidden", "10"])
    shape = dict(world=2, hidden=10)
    by_sms, extra, errors = multi_process._swiftep_world(shape, [4], args)
    assert errors == []
    assert by_sms[4] == {"dispatch": 2.2, "combine": 4.0, "combine, own tensor": 7.0,
                         "combine, torch copy": 5.0, "combine, symmetric pool": 4.5,
                         "step, own tensor": 9.0, "step, symmetric pool": 6.5}
    row = 10 * 2
    assert extra["world_bytes"] == dict(pairs_per_rank=200.0,
                                        dispatch=(50 + 200 + 150 + 600) * row,
                                        combine=(200 + 50 + 600 + 150) * row,
                                        link_dispatch=300 * row, link_combine=300 * row)
    records = build_records(by_sms, extra["world_bytes"], {}, 2, 10, {})
    result = dict(check_tokens=256)
    assert multi_process._finish(result, records, {}, [], str(tmp_path)) == 0
    saved = json.loads((tmp_path / "multi_process.json").read_text())
    assert saved["records"][0]["op"] == "dispatch" and saved["errors"] == []
    fake[1]["errors"] = ["combine differs"]
    assert multi_process._swiftep_world(shape, [4], args)[2] == ["rank 1: combine differs"]


def test_one_gpu_per_rank_quotes_each_gpu_against_its_own_ceiling():
    """Two ranks on two GPUs: each GPU's ranks' bytes against one GPU's ceiling at its SMs."""
    by_sms = {4: dict(dict.fromkeys(OPS, 1.0))}
    world_bytes = dict(pairs_per_rank=100.0, dispatch=4e9, combine=4e9)
    shared = build_records(by_sms, world_bytes, {8: 1000.0}, 2, 10, {})  # both on one GPU
    apart = build_records(by_sms, world_bytes, {4: 1000.0}, 2, 10, {}, sharing=1)
    assert shared[0]["sms_total"] == 8 and apart[0]["sms_total"] == 4
    assert shared[0]["ceiling_fraction"] == pytest.approx(2.0)  # 4 GB/ms over 2 TB/s r+w
    assert apart[0]["ceiling_fraction"] == pytest.approx(1.0)  # half the bytes on each GPU


def test_deepep_with_its_users_permutation_gets_columns_of_its_own():
    perm = dict(to_experts=0.5, from_experts=0.25)
    plus = deepep_peer.with_permutation({"dispatch": 3.0, "combine": 6.0, "step": 9.0}, perm)
    assert (plus["dispatch"], plus["combine"], plus["step"]) == (3.5, 6.25, 9.75)
    peers = {"deepep": {"status": "ran", "by_sms": {4: {"dispatch": 3.0, "combine": 6.0,
                                                        "step": 9.0}}},
             "deepep+permute": {"status": "ran", "by_sms": {4: plus}}}
    records = _records(peers)
    assert records[0]["peers"]["deepep+permute"]["ms"] == 3.5
    header = format_report(records, peers).splitlines()[0]
    assert "DeepEP ms" in header and "DeepEP+permute ms" in header and "torch" not in header


def test_with_a_gpu_per_rank_dispatch_and_combine_are_quoted_against_the_link():
    from torch_swiftep.bench.metrics import RoutingBytes

    idx = torch.tensor([[0, 1], [2, 3], [0, 2], [-1, 3]])  # 4 experts, 2 ranks
    r0 = RoutingBytes.of(idx, 4, 2, rank=0)
    assert (r0.rows, r0.remote_rows, r0.token_rank_pairs, r0.remote_pairs) == (7, 4, 5, 3)
    assert RoutingBytes.of(idx, 4, 2).remote_rows == 0  # no source rank: not counted
    by_sms = {4: dict(dict.fromkeys(OPS, 1.0))}
    world_bytes = dict(pairs_per_rank=100.0, dispatch=4e9, combine=4e9, link_dispatch=2e8,
                       link_combine=4e8)
    records = build_records(by_sms, world_bytes, {4: 1000.0}, 2, 10, {}, sharing=1,
                            link_gbps=400.0)
    by_op = {r["op"]: r for r in records}
    assert by_op["dispatch"]["link_fraction"] == pytest.approx(0.5)  # 200 GB/s of 400
    assert by_op["combine, symmetric pool"]["link_fraction"] == pytest.approx(1.0)
    assert by_op["step, symmetric pool"]["link_fraction"] is None
    assert "of link" in format_report(records, {}).splitlines()[0]
    assert "of link" not in format_report(build_records(by_sms, world_bytes, {}, 2, 10, {}),
                                          {}).splitlines()[0]


def test_ranks_land_on_gpus_round_robin():
    from torch_swiftep.launch import rank_gpu, ranks_per_gpu

    assert [rank_gpu(r, 2) for r in range(4)] == [0, 1, 0, 1]
    assert [rank_gpu(r, 1) for r in range(3)] == [0, 0, 0]
    assert (ranks_per_gpu(8, 1), ranks_per_gpu(8, 2), ranks_per_gpu(2, 8), ranks_per_gpu(3, 2)) \
        == (8, 4, 1, 2)
    assert fit_budgets([64, 66], ranks_per_gpu(2, 2), 132) == ([64, 66], [])


def test_budgets_that_do_not_fit_are_dropped():
    kept, dropped = fit_budgets([2, 4, 16, 24], 8, 132)
    assert kept == [2, 4, 16] and len(dropped) == 1 and "24 SMs/rank dropped" in dropped[0]


def test_mps_status_reads_the_control_pipe(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert multi_process.mps_status()["active"] is False
    (tmp_path / "control").touch()
    status = multi_process.mps_status()
    assert status["active"] is True and status["compute_mode"]


def test_deepep_not_importable_is_reported_not_run():
    if deepep_peer.import_error() is None:
        pytest.skip("deep_ep imports here")
    shape = dict(world=2, tokens=8, hidden=256, topk=2, experts=4, check_tokens=8)
    result = deepep_peer.run(shape, [2], [2, 10], 1, 10)
    assert result["status"].startswith("not run: import deep_ep failed")
    assert "per rank" in result["sm_budget"]


def test_cpu_machine_runs_nothing(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["--world", "2", "--experts", "4"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


# ----------------------------------------------------------------- scripts/build_deepep.sh
SETUP = """import os
if __name__ == '__main__':
    disable_nvshmem = False
    if not disable_nvshmem:
        assert os.path.exists('x')
    nvcc_flags = []
    nvcc_flags.extend(['-rdc=true', '--ptxas-options=--register-usage-level=10'])
"""
CPP = """void Buffer::low_latency_update_mask_buffer(int rank_to_mask, bool mask) {
    internode_ll::update_mask_buffer(mask_buffer_ptr, rank_to_mask, mask, stream);
}
void Buffer::low_latency_query_mask_buffer(const torch::Tensor& mask_status) {
    internode_ll::query_mask_buffer(
        mask_buffer_ptr, num_ranks, ptr, stream);
}
void Buffer::low_latency_clean_mask_buffer() {
    internode_ll::clean_mask_buffer(mask_buffer_ptr, num_ranks, stream);
}
"""


def _build(tmp_path, setup, cpp):
    src = tmp_path / "DeepEP"
    (src / "csrc").mkdir(parents=True)
    (src / "setup.py").write_text(setup)
    (src / "csrc" / "deep_ep.cpp").write_text(cpp)
    dest = tmp_path / "build"
    env = dict(os.environ, DEEPEP_SRC=str(src), DEEPEP_EDIT_ONLY="1")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build_deepep.sh"), str(dest)],
                          env=env, capture_output=True, text=True, timeout=60)
    return done, dest


def test_build_script_edits_a_copy(tmp_path):
    done, dest = _build(tmp_path, SETUP, CPP)
    assert done.returncode == 0, done.stderr
    setup = (dest / "setup.py").read_text()
    assert "-rdc=true" not in setup and "disable_nvshmem = True" in setup
    assert setup.index("disable_nvshmem = True") < setup.index("if not disable_nvshmem")
    cpp = (dest / "csrc" / "deep_ep.cpp").read_text()
    assert cpp.count("#ifndef DISABLE_NVSHMEM") == 3 and cpp.count("#endif") == 3
    assert "#ifndef DISABLE_NVSHMEM\n    internode_ll::query_mask_buffer(\n" in cpp
    assert (tmp_path / "DeepEP" / "setup.py").read_text() == SETUP  # the source is untouched
    again, _ = _build(tmp_path / "again", SETUP, CPP.replace("update_mask", "no_mask"))
    assert again.returncode != 0 and "update_mask_buffer 0 times" in again.stderr


def test_build_script_fails_loudly_on_an_unknown_setup(tmp_path):
    done, _ = _build(tmp_path, SETUP.replace("'-rdc=true', ", ""), "")
    assert done.returncode != 0 and "'-rdc=true' 0 times" in done.stderr


# --------------------------------------------------------------------------------- the GPU run
def _gpu(test):
    """The CUDA test files' marks (gpu_world.GPU_MARKS) on one test."""
    for mark in GPU_MARKS:
        test = mark(test)
    return test


@_gpu
@pytest.mark.slow
def test_gpu_run_writes_json(tmp_path):
    """A tiny world (without MPS the two processes take turns: correct, slow, times
    meaningless); every combine mode checked (the symmetric pool's too), every op timed."""
    code = main(["--world", "2", "--tokens", "64", "--hidden", "256", "--topk", "2",
                 "--experts", "8", "--sms", "2", "--repeats", "2", "--check-tokens", "16",
                 "--peers", "none", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "multi_process.json").read_text())
    assert code == 0, result["errors"]
    assert [r["op"] for r in result["records"]] == list(OPS)
    assert all(r["ms"] > 0 for r in result["records"] if r["op"] == "dispatch")
