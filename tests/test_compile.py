"""torch.compile(fullgraph=True) of an expert-parallel MoE layer: no graph break, same result
as eager, on a world of one (in process) and of two (gloo processes)."""
import pytest
import torch
import torch.distributed as dist

import torch_swiftep as ts
from torch_swiftep import testing
from torch_swiftep.launch import run_world
from torch_swiftep.moe import ExpertParallelMoE

E, H, K, FFN, T = 8, 64, 2, 32, 24


def _config():
    return ts.CommConfig(num_experts=E, hidden=H, num_topk=K, max_tokens_per_rank=T,
                         ll_max_tokens_per_rank=T)


def _compare(layer, x):
    torch._dynamo.reset()
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)(x)
    # inductor fuses the bf16 expert math differently from eager: bf16 tolerance
    return testing.close(compiled, eager, torch.bfloat16)


@pytest.mark.parametrize("low_latency", [False, True])
def test_compile_fullgraph_world_of_one(low_latency):
    layer = ExpertParallelMoE(ts.Communicator(None, _config()), FFN, low_latency=low_latency)
    x = torch.randn(T - 3, H).bfloat16()
    assert _compare(layer, x) is None


def test_compiled_graph_has_the_ops():
    layer = ExpertParallelMoE(ts.Communicator(None, _config()), FFN)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(torch.randn(7, H).bfloat16())
    assert explanation.graph_break_count == 0
    targets = {str(n.target) for g in explanation.graphs for n in g.graph.nodes}
    assert {"swiftep.dispatch", "swiftep.combine"} <= targets, targets


def _compile_in_world(rank, world):
    comm = ts.Communicator(dist.group.WORLD, _config())
    layer = ExpertParallelMoE(comm, FFN)
    x = torch.randn(5 + 4 * rank, H, generator=torch.Generator().manual_seed(rank)).bfloat16()
    return _compare(layer, x)


@pytest.mark.slow
def test_compile_fullgraph_world_of_two():
    errors = run_world(2, _compile_in_world, timeout_s=300)
    assert errors == [None, None], errors
