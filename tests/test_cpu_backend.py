"""The CPU (gloo) backend against the whole-world reference, over world sizes 1-4.

One process group per world size runs every case (spawning is the slow part). Each rank builds
all ranks' inputs from the case's seed, so it checks its own results against the reference
without extra communication.
"""
import pytest
import torch
import torch.distributed as dist

import torch_swiftep as ts
from torch_swiftep import reference, testing
from torch_swiftep.launch import run_world

TOKENS = [5, 0, 17, 3]  # uneven, one rank with no tokens at all


def _cases(world):
    experts = 12 if world == 3 else 16
    cases = []
    seed = 100 * world
    for dtype, hidden in ((torch.bfloat16, 40), (torch.float32, 36), (torch.bfloat16, 136)):
        for k, routing in ((1, "uniform"), (2, "skewed"), (8, "holes"), (3, "one_rank")):
            seed += 1
            cases.append(dict(seed=seed, dtype=dtype, hidden=hidden, topk=k, routing=routing,
                              experts=experts, fp8=False))
    cases.append(dict(seed=seed + 1, dtype=torch.bfloat16, hidden=256, topk=4, routing="holes",
                      experts=experts, fp8=True))
    cases.append(dict(seed=seed + 2, dtype=torch.float16, hidden=64, topk=2, routing="uniform",
                      experts=experts, fp8=False))
    cases.append(dict(seed=seed + 3, dtype=torch.bfloat16, hidden=256, topk=3, routing="skewed",
                      experts=experts, fp8="fused"))  # quantize_fp8=True inside dispatch
    return cases


def _run_case(rank, world, case):
    # rotate so that, over the cases, every rank is sometimes the empty one
    tokens = [TOKENS[(r + case["seed"]) % len(TOKENS)] for r in range(world)]
    fused = case["fp8"] == "fused"
    inp = testing.world_inputs(case["seed"], tokens, case["hidden"], case["experts"],
                               case["topk"], case["dtype"], case["routing"], case["fp8"] is True)
    sent_xs, sent_scales = inp.xs, inp.x_scales  # what lands in the windows
    if fused:
        quantized = [ts.quantize_fp8(x) for x in inp.xs]
        sent_xs, sent_scales = [q for q, _ in quantized], [s for _, s in quantized]
    config = ts.CommConfig(num_experts=case["experts"], hidden=case["hidden"],
                           num_topk=case["topk"], max_tokens_per_rank=max(max(tokens), 1),
                           dtype=case["dtype"], ll_max_tokens_per_rank=max(max(tokens), 1))
    comm = ts.Communicator(dist.group.WORLD, config)
    tag = f"case {case}"
    errors = []
    scales = inp.x_scales[rank] if case["fp8"] is True else None

    # throughput path
    ref, ref_rows = reference.dispatch(sent_xs, inp.topk_idx, inp.topk_weights,
                                       case["experts"], sent_scales)
    got = comm.dispatch(inp.xs[rank], inp.topk_idx[rank], inp.topk_weights[rank],
                        x_scales=scales, quantize_fp8=fused)
    errors += testing.compare_dispatch(rank, got, ref[rank], ref_rows[rank])
    out_dtype = torch.bfloat16 if case["fp8"] else case["dtype"]
    ref_outs = [testing.fake_expert(r.recv_x, r.expert_offsets, out_dtype, r.recv_scales)
                for r in ref]
    ref_y = reference.combine(ref_outs, inp.topk_idx, inp.topk_weights, ref_rows,
                              case["experts"])[rank]
    mine = testing.fake_expert(got.recv_x, got.expert_offsets, out_dtype, got.recv_scales)
    if case["seed"] % 2:  # zero-copy: experts write straight into the combine window
        expert_out = comm.combine_buffer(out_dtype)
        expert_out.copy_(mine)
    else:
        expert_out = mine
    y = comm.combine(expert_out, got)
    msg = testing.close(y, ref_y, out_dtype)
    if msg:
        errors.append(f"rank {rank}: combine {msg}")

    # low-latency path
    ll_ref, ll_rows = reference.low_latency_dispatch(
        sent_xs, inp.topk_idx, inp.topk_weights, case["experts"], max(max(tokens), 1),
        sent_scales)
    ll = comm.low_latency_dispatch(inp.xs[rank], inp.topk_idx[rank], inp.topk_weights[rank],
                                   x_scales=scales, quantize_fp8=fused)
    errors += testing.compare_low_latency(rank, ll, ll_ref[rank], ll_rows[rank])
    local = config.num_experts // world
    flat = ll.recv_x.reshape(-1, case["hidden"])
    flat_offsets = torch.arange(local + 1, dtype=torch.int32) * comm.plan.ll_rows_per_expert
    ll_scales = ll.recv_scales.reshape(flat.size(0), -1) if ll.recv_scales is not None else None
    ll_out = testing.fake_expert(flat, flat_offsets, out_dtype, ll_scales).view(
        local, -1, case["hidden"])
    y_ll = comm.low_latency_combine(ll_out, ll)
    msg = testing.close(y_ll, ref_y, out_dtype)
    if msg:
        errors.append(f"rank {rank}: low_latency_combine {msg}")
    return [f"{tag}: {e}" for e in errors]


def _all_cases(rank, world):
    errors = []
    for case in _cases(world):
        errors += _run_case(rank, world, case)
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_cpu_backend_matches_reference(world):
    results = run_world(world, _all_cases, timeout_s=240)
    errors = [e for per_rank in results for e in per_rank]
    assert not errors, "\n".join(errors[:20])


def test_dispatch_layout_counts():
    inp = testing.world_inputs(5, [23], 8, 16, 3, torch.float32, "holes")
    idx = inp.topk_idx[0]
    per_rank, per_expert, in_rank = torch.ops.swiftep.dispatch_layout(idx, 16, 4)
    for e in range(16):
        assert per_expert[e] == int((idx == e).sum())
    owner = torch.where(idx >= 0, idx // 4, -1)
    for r in range(4):
        expect = (owner == r).any(1)
        assert torch.equal(in_rank[:, r], expect)
        assert per_rank[r] == int(expect.sum())


def test_plain_torch_baseline_matches_reference():
    """The benchmark's plain-torch path computes the same function (else its timing means
    nothing)."""
    from torch_swiftep.bench.torch_baseline import torch_combine, torch_dispatch

    inp = testing.world_inputs(9, [7, 0, 12], 16, 6, 2, torch.float32, "holes")
    recvs, plan = torch_dispatch(inp.xs, inp.topk_idx, 6)
    ref, ref_rows = reference.dispatch(inp.xs, inp.topk_idx, inp.topk_weights, 6)
    for got, want in zip(recvs, ref):
        assert torch.equal(got, want.recv_x)
    outs = [r * 2 for r in recvs]
    ys = torch_combine(outs, plan, inp.topk_weights)
    ref_y = reference.combine([r.recv_x * 2 for r in ref], inp.topk_idx, inp.topk_weights,
                              ref_rows, 6)
    for a, b in zip(ys, ref_y):
        assert testing.close(a, b, torch.float32) is None


def test_fp8_round_trip():
    x = torch.randn(9, 256) * torch.logspace(-3, 3, 9).unsqueeze(1)
    x[3] = 0
    q, s = ts.quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (9, 2)
    back = ts.dequantize_fp8(q, s)
    rel = (back - x).abs() / x.abs().amax(1, keepdim=True).clamp(min=1e-12)
    assert rel.max() < 2 ** -3  # e4m3: 3 mantissa bits
    assert torch.equal(back[3], torch.zeros(256))


def _fuzz(rank, world):
    """Random configurations drawn from a seed every rank shares: sizes, dtypes, routing."""
    gen = torch.Generator().manual_seed(4242)
    errors = []
    for case in range(12):
        local = int(torch.randint(1, 5, (1,), generator=gen))
        experts = local * world
        topk = int(torch.randint(1, min(experts, 8) + 1, (1,), generator=gen))
        dtype = [torch.bfloat16, torch.float16, torch.float32][case % 3]
        hidden = int(torch.randint(1, 40, (1,), generator=gen)) * (16 // dtype.itemsize)
        routing = testing.ROUTINGS[int(torch.randint(0, 4, (1,), generator=gen))]
        tokens = [int(t) for t in torch.randint(0, 30, (world,), generator=gen)]
        c = dict(seed=9000 + case, dtype=dtype, hidden=hidden, topk=topk, routing=routing,
                 experts=experts, fp8=False)
        inp = testing.world_inputs(c["seed"], tokens, hidden, experts, topk, dtype, routing)
        comm = ts.Communicator(dist.group.WORLD, ts.CommConfig(
            num_experts=experts, hidden=hidden, num_topk=topk,
            max_tokens_per_rank=max(max(tokens), 1), dtype=dtype))
        ref, ref_rows = reference.dispatch(inp.xs, inp.topk_idx, inp.topk_weights, experts)
        got = comm.dispatch(inp.xs[rank], inp.topk_idx[rank], inp.topk_weights[rank])
        errors += [f"fuzz {c} tokens {tokens}: {e}" for e in
                   testing.compare_dispatch(rank, got, ref[rank], ref_rows[rank])]
        outs = [testing.fake_expert(r.recv_x, r.expert_offsets, dtype) for r in ref]
        ref_y = reference.combine(outs, inp.topk_idx, inp.topk_weights, ref_rows, experts)
        out = comm.combine_buffer()
        out.copy_(testing.fake_expert(got.recv_x, got.expert_offsets, dtype))
        msg = testing.close(comm.combine(out, got), ref_y[rank], dtype)
        if msg:
            errors.append(f"fuzz {c} tokens {tokens}: rank {rank}: combine {msg}")
    return errors


@pytest.mark.slow
def test_cpu_backend_fuzz():
    results = run_world(3, _fuzz, timeout_s=240)
    errors = [e for per_rank in results for e in per_rank]
    assert not errors, "\n".join(errors[:20])
