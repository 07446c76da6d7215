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


@pytest.mark.parametrize("low_latency", [False, True])
def test_combine_window_inside_compile_is_refused_with_the_reason(low_latency):
    """A write into the combine window inside a compiled region would reach combine as a
    temporary copy of the workspace (inductor functionalizes it), which the peers never see:
    fullgraph compilation refuses it, naming the way out; eager does it in place."""
    comm = ts.Communicator(None, _config())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T - 1, H, generator=gen).bfloat16()
    idx = torch.rand(T - 1, E, generator=gen).topk(K, dim=1).indices
    w = torch.rand(T - 1, K, generator=gen)

    def step(x, idx, w):
        if low_latency:
            h = comm.low_latency_dispatch(x, idx, w)
            window = comm.low_latency_combine_buffer(x.dtype)
            window.copy_(h.recv_x)
            return comm.low_latency_combine(window, h)
        h = comm.dispatch(x, idx, w)
        window = comm.combine_buffer(x.dtype)
        window.copy_(h.recv_x)
        return comm.combine(window, h)

    eager = step(x, idx, w)
    want = (x.float() * w.sum(1, keepdim=True)).bfloat16()  # the identity expert, weighted
    assert testing.close(eager, want, torch.bfloat16) is None
    torch._dynamo.reset()
    with pytest.raises(Exception, match="not available inside torch.compile"):
        torch.compile(step, fullgraph=True)(x, idx, w)


@pytest.mark.parametrize("low_latency", [False, True])
def test_eager_layer_equals_the_dense_layer(low_latency):
    """Eager: the throughput layer's experts write into the symmetric pool (read in place), the
    low-latency layer's last bmm into the combine window (out=): both equal the dense layer."""
    from torch_swiftep.moe import dense_reference

    layer = ExpertParallelMoE(ts.Communicator(None, _config()), FFN, low_latency=low_latency)
    x = torch.randn(T - 3, H, generator=torch.Generator().manual_seed(3)).bfloat16()
    assert testing.close(layer(x), dense_reference([layer], x), torch.bfloat16) is None
