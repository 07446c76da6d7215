"""The main job's command line (python -m torch_swiftep.bench) on the CPU backend."""
import json

import pytest
import torch

from torch_swiftep.bench.__main__ import main

TINY = ["--cpu", "--world", "2", "--tokens", "6", "--decode-tokens", "3", "--hidden", "256",
        "--topk", "2", "--experts", "4"]


@pytest.mark.slow
def test_cpu_main_job_writes_json_and_passes(tmp_path, capfd):
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cpu_backend.json").read_text())
    assert result["check"] == "passed" and result["errors"] == []
    assert [r["op"] for r in result["records"]] == [
        "dispatch", "combine", "low_latency_dispatch", "low_latency_combine"]
    assert all(r["check"] == "passed" and r["ms"] > 0 for r in result["records"])
    out = capfd.readouterr().out
    assert "throughput: 6 tokens/rank" in out and "low_latency: 3 tokens/rank" in out
    assert "check: passed" in out
    assert (tmp_path / "cpu_backend.png").exists() or "no plot written" in out


@pytest.mark.parametrize("flags, message", [
    (["--trace"], "--trace reads the GPU kernels' timestamps"),
    (["--low-latency-only", "--throughput-only"], "not allowed with argument"),
    (["--trace", "--throughput-only"], "cannot go with --throughput-only"),
    (["--experts", "5"], "this shape does not fit"),
    (["--tokens", "0"], "--tokens must be positive"),
])
def test_cpu_main_job_refuses_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(TINY + flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--world", "--tokens", "--decode-tokens", "--hidden", "--topk", "--experts",
                 "--cpu", "--out", "--quick", "--no-check", "--low-latency-only",
                 "--throughput-only", "--trace"):
        assert flag in text
    assert "(default: 7168)" in text and "(default: 8)" in text and "(default: 256)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_kernel_times_refuses_without_cuda(capsys):
    from torch_swiftep.bench import kernel_times

    assert kernel_times.main(["--world", "2"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_kernel_times_first_group_keeps_the_first_chunk_of_experts():
    # the slots kernel_times --groups G keeps: expert % local < local / G, others (and holes) -1
    from torch_swiftep.bench.kernel_times import _first_group

    world, experts = 2, 16  # 8 local experts per rank; groups of 2
    idx = torch.tensor([[0, 1, 2, 9, -1], [8, 10, 15, 7, 3]])
    kept = _first_group(idx, experts, world, groups=4)
    assert kept.tolist() == [[0, 1, -1, 9, -1], [8, -1, -1, -1, -1]]
    assert torch.equal(_first_group(idx, experts, world, groups=1), idx)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the flags are parsed before the CUDA check")
def test_kernel_times_rejects_a_bad_list(capsys):
    from torch_swiftep.bench import kernel_times

    with pytest.raises(SystemExit):
        kernel_times.main(["--groups", "0,2"])
    assert "expected positive integers" in capsys.readouterr().err
