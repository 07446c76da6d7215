"""The pipelined MoE layer on the CUDA backend, 2 ranks as processes on the GPU(s): eager and
captured in a CUDA graph, both schedules, several chunkings. With experts that compute each row
by itself, the pipelined output equals the unpipelined layer's bit for bit, and a graph replay
with fresh inputs equals the eager call on the same inputs bit for bit. Skipped without a GPU
and the compiled extension."""
import pytest
import torch
import torch.distributed as dist
from gpu_world import ENV, GPU_MARKS

import torch_swiftep as ts
from torch_swiftep.launch import rank_gpu, run_world

pytestmark = GPU_MARKS
E, H, K, FFN, N = 8, 256, 2, 128, 29
CHUNKINGS = ((N,), (10, 10, 9), (3, 17, 1, 8))
EXPERT_GROUPS = ((2, 2), (1, 3), (1, 1, 1, 1))


def _layer(rank, low_latency):
    from torch_swiftep.moe import ExpertParallelMoE
    from torch_swiftep.pipeline.layer import PipelinedMoE

    device = torch.device("cuda", rank_gpu(rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    cfg = ts.CommConfig(num_experts=E, hidden=H, num_topk=K, max_tokens_per_rank=N,
                        ll_max_tokens_per_rank=N, timeout_s=60)
    comms = [ts.Communicator(dist.group.WORLD, cfg, device=device) for _ in range(2)]
    moe = ExpertParallelMoE(comms[0], FFN, low_latency=low_latency)
    # row-wise experts and shared expert: a token's result does not depend on its chunk
    moe.experts = lambda rows, offs, pool=None: rows * 1.5 - 0.25
    moe.experts_low_latency = lambda rows, out=None: rows * 1.5 - 0.25
    layer = PipelinedMoE(moe, comms, lambda x: x * 0.5)
    return moe, comms, layer, device


def _inputs(rank, step, device):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(N, H, generator=gen).bfloat16().to(device)


def _eager_and_replayed(rank, world, low_latency):
    from torch_swiftep.pipeline import Schedule

    moe, comms, layer, device = _layer(rank, low_latency)
    errors = []
    schedules = [Schedule(chunks, 4, order, 0.0, ()) for chunks in CHUNKINGS
                 for order in ("shared_first", "interleaved")]
    if not low_latency:  # chunks of a rank's 4 experts: equal to rounding (the groups' sums)
        schedules += [Schedule(groups, 4, "shared_first", 0.0, (), "experts")
                      for groups in EXPERT_GROUPS]
    with torch.no_grad():
        for schedule in schedules:
            what = f"rank {rank} low_latency={low_latency} {schedule.split} " \
                   f"{schedule.chunks} {schedule.order}"
            x = _inputs(rank, 0, device)
            want = moe(x) + x * 0.5
            got = layer(x, schedule)
            for c in comms:
                c.check()
            diff = (got.float() - want.float()).abs().max().item()
            if not (torch.equal(got, want) if schedule.split == "tokens"
                    else diff <= 0.02 * want.float().abs().max().item()):
                errors.append(f"{what}: eager differs from the unpipelined layer, max "
                              f"|diff| {diff:.3g}")
            static_x = x.clone()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = layer(static_x, schedule)
            for step in (1, 2):
                fresh = _inputs(rank, step, device)
                static_x.copy_(fresh)
                graph.replay()
                torch.cuda.synchronize()
                for c in comms:
                    c.check()
                eager = layer(fresh, schedule)
                if not torch.equal(static_y, eager):
                    errors.append(f"{what}: replay {step} differs from the eager call")
            del graph
    return errors


@pytest.mark.parametrize("low_latency", [False, True])
def test_pipelined_layer_eager_and_in_a_cuda_graph(low_latency):
    results = run_world(2, _eager_and_replayed, low_latency, env=ENV, timeout_s=600)
    flat = [e for r in results for e in r]
    assert not flat, "\n".join(flat[:10])
