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
    shapes = [(dtype, hidden, k, routing, False)
              for dtype, hidden in ((torch.bfloat16, 40), (torch.float32, 36),
                                    (torch.bfloat16, 136))
              for k, routing in ((1, "uniform"), (2, "skewed"), (8, "holes"), (3, "one_rank"))]
    shapes += [(torch.bfloat16, 256, 4, "holes", True),
               (torch.float16, 64, 2, "uniform", False),
               (torch.bfloat16, 256, 3, "skewed", "fused"),  # quantize_fp8=True inside dispatch
               (torch.bfloat16, 48, 4, "duplicates", False)]  # an expert twice in a token
    cases = []
    for seed, (dtype, hidden, k, routing, fp8) in enumerate(shapes, start=100 * world + 1):
        # rotate so that, over the cases, every rank is sometimes the empty one
        tokens = tuple(TOKENS[(r + seed) % len(TOKENS)] for r in range(world))
        cases.append(testing.Case(seed, dtype, hidden, k, routing, experts, tokens, fp8))
    return cases


def _all_cases(rank, world):
    errors = []
    for case in _cases(world):
        comm = ts.Communicator(dist.group.WORLD, case.config())
        # odd seeds: zero-copy (the expert writes straight into the combine window)
        errors += testing.run_step(comm, rank, testing.expected(case),
                                   zero_copy=case.seed % 2 == 1)
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_cpu_backend_matches_reference(world):
    results = run_world(world, _all_cases, timeout_s=240)
    errors = [e for per_rank in results for e in per_rank]
    assert not errors, "\n".join(errors[:20])


def _nodes_cases(rank, world, per_node, partials):
    """The cases with the world grouped into nodes: the throughput schedule forwards through
    each destination node (backends/cpu_hierarchical.py) and its combine equals the reference's
    node order bit for bit; the low-latency one stays direct. partials: one node, with
    CommConfig(combine_partials=True), whose combine is the reference's with every rank its own
    node (per_node 1), bit for bit."""
    errors = []
    for case in _cases(world):
        config = (case.config(combine_partials=True) if partials
                  else case.config(ranks_per_node=per_node))
        errors += testing.run_step(ts.Communicator(dist.group.WORLD, config), rank,
                                   testing.expected(case, ranks_per_node=per_node),
                                   zero_copy=case.seed % 2 == 0)
    return [f"ranks_per_node={per_node}, combine_partials={partials}: {e}" for e in errors]


@pytest.mark.slow
@pytest.mark.parametrize("world, per_node, partials",
                         [(4, 2, False), (4, 1, False), (3, 1, False), (3, 1, True)])
def test_cpu_backend_across_nodes_matches_reference(world, per_node, partials):
    results = run_world(world, _nodes_cases, per_node, partials, timeout_s=240)
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


def _one_token_over_two_nodes(dtype):
    """A world of 4 ranks, one expert each; rank 0's one token names expert 0 (value 1, weight
    1), expert 2 (2^-9, weight 1) and expert 1 (2^-7, weight 1/2): slot order interleaves the
    nodes {0, 1} and {2, 3}. Returns rank 0's y from reference.combine, as a function of its
    keywords (ranks_per_node)."""
    outs = [torch.tensor([[1.0]]), torch.tensor([[2.0 ** -7]]), torch.tensor([[2.0 ** -9]]),
            torch.empty(0, 1)]
    idx = [torch.tensor([[0, 2, 1]])] + [torch.empty(0, 3, dtype=torch.long)] * 3
    weights = [torch.tensor([[1.0, 1.0, 0.5]])] + [torch.empty(0, 3)] * 3
    rows = [torch.zeros(1, 3, dtype=torch.int32)] + [torch.empty(0, 3, dtype=torch.int32)] * 3
    args = ([o.to(dtype) for o in outs], idx, weights, rows, 4)
    return lambda **kw: reference.combine(*args, **kw)[0]


def test_reference_combine_across_nodes_rounds_each_partial_in_node_order():
    y = _one_token_over_two_nodes(torch.bfloat16)
    # flat, slot order: 1 + 2^-9 + 2^-8 = 1 + 0.75 ulp (bf16's ulp at 1 is 2^-7): rounds up
    flat = y()
    assert flat.item() == 1.0 + 2.0 ** -7
    # nodes: node 0's partial 1 + 2^-8 is a tie, rounded to even: 1.0; node 1's is 2^-9;
    # 1 + 2^-9 = 1 + 0.25 ulp rounds down
    nodes = y(ranks_per_node=2)
    assert nodes.dtype == torch.bfloat16 and nodes.item() == 1.0
    assert not torch.equal(testing._bits(nodes), testing._bits(flat))
    # one node is the flat sum, exactly; a node per rank here happens to round like the flat sum
    assert torch.equal(testing._bits(y(ranks_per_node=4)), testing._bits(flat))
    assert y(ranks_per_node=1).item() == 1.0 + 2.0 ** -7
    # float32: both orders are exact here, so they agree
    y32 = _one_token_over_two_nodes(torch.float32)
    assert y32(ranks_per_node=2).item() == y32().item() == 1.0 + 2.0 ** -8 + 2.0 ** -9


@pytest.mark.parametrize("bad", [0, -2, 3, 8, 2.0, True])
def test_reference_combine_refuses_a_bad_ranks_per_node(bad):
    y = _one_token_over_two_nodes(torch.bfloat16)
    with pytest.raises(ValueError, match=rf"ranks_per_node={bad!r}"):
        y(ranks_per_node=bad)


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
    """Random configurations drawn from a seed every rank shares: sizes, dtypes, routing (every
    kind, repeated experts too), one node or one node per rank."""
    gen = torch.Generator().manual_seed(4242)
    errors = []
    for case in range(12):
        local = int(torch.randint(1, 5, (1,), generator=gen))
        experts = local * world
        topk = int(torch.randint(1, min(experts, 8) + 1, (1,), generator=gen))
        dtype = [torch.bfloat16, torch.float16, torch.float32][case % 3]
        hidden = int(torch.randint(1, 40, (1,), generator=gen)) * (16 // dtype.itemsize)
        routing = testing.ROUTINGS[int(torch.randint(0, len(testing.ROUTINGS), (1,),
                                                     generator=gen))]
        tokens = tuple(int(t) for t in torch.randint(0, 30, (world,), generator=gen))
        c = testing.Case(9000 + case, dtype, hidden, topk, routing, experts, tokens)
        per_node = 1 if case % 2 else None  # every other case across nodes (one rank each)
        comm = ts.Communicator(dist.group.WORLD, c.config(ll_max_tokens_per_rank=0,
                                                          ranks_per_node=per_node))
        errors += testing.run_step(comm, rank, testing.expected(c, ranks_per_node=per_node),
                                   zero_copy=True,
                                   schedules=("throughput",))
    return errors


@pytest.mark.slow
def test_cpu_backend_fuzz():
    results = run_world(3, _fuzz, timeout_s=240)
    errors = [e for per_rank in results for e in per_rank]
    assert not errors, "\n".join(errors[:20])


def test_cross_node_rows_count_one_row_per_token_and_node():
    from torch_swiftep.backends.cpu_hierarchical import cross_node_rows

    # 4 ranks in 2 nodes, 2 experts per rank. Rank 0's token 0 goes to ranks 2 and 3 (node 1)
    # and rank 1 (its own node); token 1 to nobody; rank 3's token to ranks 0 and 2.
    idx = [torch.tensor([[4, 6, 2], [-1, -1, -1]]), torch.empty(0, 3, dtype=torch.long),
           torch.empty(0, 3, dtype=torch.long), torch.tensor([[0, 5, -1]])]
    counts = cross_node_rows(idx, num_experts=8, ranks_per_node=2)
    assert counts == {"hierarchical_rows": 2, "flat_rows": 3,
                      "rows_per_node_pair": {(0, 1): 1, (1, 0): 1}}


def test_scale_out_model_is_link_bound_and_counts_its_sms():
    from torch_swiftep.bench.scale_out_model import predict

    rates = {"dispatch": 60.0, "combine": 23.0, "nvlink_dispatch": 3000.0,
             "nvlink_combine": 3000.0}
    result = predict(16, 8, tokens=256, rates=rates)
    for op in ("dispatch", "combine"):
        r = result[op]
        assert r["bound"] == "NIC" and r["sms"] >= 1
        assert r["time_us"] >= max(r["nic_us"], r["nvlink_us"])
    slow = predict(16, 8, tokens=256, rates=dict(rates, nvlink_dispatch=30.0))
    assert slow["dispatch"]["bound"] == "NVLink" and slow["combine"]["bound"] == "NIC"
    assert result["combine"]["sms"] > result["dispatch"]["sms"]  # combine moves fewer bytes/SM


def test_scale_out_model_reads_its_rates_from_the_two_gpu_run():
    from torch_swiftep.bench.scale_out_model import measured_rates

    rates = measured_rates()  # docs/results/multi_process_2gpu.json: 32768 rows of 14336 B
    assert rates["dispatch"] == pytest.approx(32768 * 14336 / 1.158e-3 / 8 / 1e9, rel=0.01)
    assert 250 < rates["nvlink_dispatch"] < 394  # below the copy engine's rate there
