"""The CUDA Communicator across nodes: CommConfig(ranks_per_node=P < world) runs the hierarchical
throughput schedule over NVSHMEM (torch_swiftep/scale_out). Ranks are processes on the GPUs
there are (on one GPU all of them, NVSHMEM's P2P between processes of one device), grouped into
virtual nodes, so every cross-node row really goes through NVSHMEM puts and signals. Worlds 4
(2x2) and 8 (2x4, 4x2); bf16, fp32, FP8 and quantize_fp8; uneven, skewed, empty and -1 routing;
dispatch and combine bit for bit against the reference (combine in the node order of
reference.combine(..., ranks_per_node=P)); a rank that never arrives is named, with its node,
by the others within the bound."""
import os

import pytest
import torch
import torch.distributed as dist
from gpu_world import ENV, GPU_MARKS
from test_nvshmem_link import (  # noqa: F401 - fixture
    NEEDS_BUILD,
    _library,
    _with,
    build,  # noqa: F401 - the library, built once per module
)

import torch_swiftep as ts
from torch_swiftep import testing
from torch_swiftep.launch import rank_gpu, run_world

pytestmark = GPU_MARKS


def _no_errors(world, fn, *args, timeout_s=600):
    """Runs fn on `world` ranks; fails with the first mismatches any rank reported."""
    errors = run_world(world, fn, *args, env=ENV, timeout_s=timeout_s)
    flat = [e for per_rank in errors for e in per_rank]
    assert not flat, "\n".join(flat[:20])


def _device(library):
    os.environ["SWIFTEP_NVSHMEM_LIB"] = library
    torch.cuda.set_device(rank_gpu(dist.get_rank(), torch.cuda.device_count()))
    return torch.device("cuda", torch.cuda.current_device())


def _cases(world):
    shapes = [  # (dtype, hidden, topk, routing, fp8)
        (torch.bfloat16, 512, 4, "uniform", False),
        (torch.bfloat16, 512, 3, "holes", False),
        (torch.float32, 256, 2, "skewed", False),
        (torch.bfloat16, 512, 4, "one_rank", False),
        (torch.bfloat16, 512, 4, "duplicates", False),
        (torch.bfloat16, 512, 4, "holes", True),
        (torch.bfloat16, 1024, 2, "skewed", "fused"),
    ]
    tokens = [(3 * r + 5) % 11 for r in range(world)]  # uneven, one rank with none (r = 2)
    return [testing.Case(seed=100 * world + i, dtype=d, hidden=h, topk=k, routing=rt,
                         experts=2 * world, tokens=tokens, fp8=f)
            for i, (d, h, k, rt, f) in enumerate(shapes)]


def _all_cases(rank, world, per_node, library):
    device = _device(library)
    comms, errors = {}, []
    for case in _cases(world):
        key = (case.hidden, case.topk, case.dtype)
        if key not in comms:
            comms[key] = ts.Communicator(dist.group.WORLD, case.config(
                max_tokens_per_rank=16, ll_max_tokens_per_rank=16, ranks_per_node=per_node,
                timeout_s=60), device=device)
        exp = testing.expected(case, ranks_per_node=per_node)
        for _ in range(2):  # again: every buffer reused, epochs advance
            errors += testing.run_step(comms[key], rank, exp, zero_copy=case.seed % 2 == 1,
                                       device=device)  # both schedules
            errors += _low_latency_bits(comms[key], rank, exp, device)
    return errors


def _low_latency_bits(comm, rank, exp, device) -> list:
    """The direct low-latency combine across nodes is the flat slot sum, bit for bit."""
    x, idx, w, scales = exp.rank_inputs(rank, device)
    handle = comm.low_latency_dispatch(x, idx, w, x_scales=scales, quantize_fp8=exp.case.fused)
    y = comm.low_latency_combine(testing.expert_output(handle, exp.case.out_dtype), handle)
    msg = testing.same_bits(y.cpu(), exp.y[rank])
    return [f"{exp.case}: rank {rank}: low_latency_combine {msg}"] if msg else []


@_with(NEEDS_BUILD)
@pytest.mark.parametrize("world,per_node", [(4, 2), (8, 4), (8, 2)])
def test_cuda_across_nodes_matches_reference(build, world, per_node):  # noqa: F811
    _no_errors(world, _all_cases, per_node, _library(build), timeout_s=900)


def _missing_rank(rank, world, library):
    device = _device(library)
    cfg = ts.CommConfig(num_experts=8, hidden=256, num_topk=2, max_tokens_per_rank=16,
                        timeout_s=3.0, ranks_per_node=2)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    if rank == 3:
        import time

        time.sleep(cfg.timeout_s + 8)  # alive (its buffers mapped) but never calls dispatch
        return "absent"
    x = torch.randn(16, 256, device=device).bfloat16()
    try:
        comm.dispatch(x, torch.randint(0, 8, (16, 2), device=device),
                      torch.rand(16, 2, device=device))
    except ts.SwiftepError as exc:
        return str(exc)
    return "no error"


@_with(NEEDS_BUILD)
def test_cuda_across_nodes_names_a_missing_rank_and_its_node(build):  # noqa: F811
    results = run_world(4, _missing_rank, _library(build), env=ENV, timeout_s=240)
    assert results[3] == "absent"
    for rank in range(3):
        assert "waiting for rank 3 (node 1)" in results[rank], (rank, results[rank])


def _graph_replays(rank, world, library):
    """The low-latency step across nodes captured once in a CUDA graph, replayed on fresh
    inputs copied into its static tensors: every replay matches the reference bit for bit."""
    device = _device(library)
    cases = [testing.Case(seed=s, dtype=torch.bfloat16, hidden=512, topk=4, routing=r,
                          experts=2 * world, tokens=[6, 8, 0, 5][:world])
             for s, r in ((71, "holes"), (72, "uniform"), (73, "skewed"))]
    comm = ts.Communicator(dist.group.WORLD, cases[0].config(
        max_tokens_per_rank=8, ll_max_tokens_per_rank=8, ranks_per_node=2, timeout_s=60),
        device=device)
    x, idx, w, _ = testing.expected(cases[0]).rank_inputs(rank, device)

    def step():
        handle = comm.low_latency_dispatch(x, idx, w)
        return handle, comm.low_latency_combine(testing.expert_output(handle, torch.bfloat16),
                                                handle)

    step()  # eager first: kernels loaded, sources registered
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        handle, y = step()
    errors = []
    for case in cases[1:] + cases[:1]:
        exp = testing.expected(case)
        xs, ids, ws, _ = exp.rank_inputs(rank, device)
        x.copy_(xs)
        idx.copy_(ids)
        w.copy_(ws)
        torch.cuda.synchronize()
        graph.replay()
        comm.check()
        ref, rows = exp.low_latency(8)
        errors += testing.compare_low_latency(rank, handle, ref[rank], rows[rank])
        msg = testing.same_bits(y.cpu(), exp.y[rank])
        errors += [f"{case}: rank {rank}: replayed combine {msg}"] if msg else []
    return errors


@_with(NEEDS_BUILD)
def test_low_latency_across_nodes_replays_in_a_cuda_graph(build):  # noqa: F811
    _no_errors(4, _graph_replays, _library(build))


def _layers_across_nodes(rank, world, library):
    """ExpertParallelMoE on a Communicator across nodes, both schedules, eager, against the
    dense layer: the package's own layer runs unchanged there."""
    from test_gpu import _all_layers

    from torch_swiftep.moe import ExpertParallelMoE, dense_reference

    device = _device(library)
    cfg = ts.CommConfig(num_experts=4 * world, hidden=256, num_topk=4, max_tokens_per_rank=32,
                        ll_max_tokens_per_rank=32, ranks_per_node=2, timeout_s=60)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    errors = []
    for low_latency in (False, True):
        layer = ExpertParallelMoE(comm, 128, low_latency=low_latency)
        for step in range(2):
            gen = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(17 + 5 * step, 256, generator=gen).bfloat16().to(device)
            got = layer(x)
            comm.check()
            want = dense_reference(_all_layers(comm, world, layer), x)
            msg = testing.close(got, want, torch.bfloat16)
            if msg:
                errors.append(f"rank {rank} low_latency={low_latency} step {step}: {msg}")
    return errors


@_with(NEEDS_BUILD)
def test_expert_parallel_layer_across_nodes(build):  # noqa: F811
    _no_errors(4, _layers_across_nodes, _library(build))
