"""CUDA backend tests. Ranks are processes sharing one GPU through torch symmetric memory
(TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1; they take turns on the GPU, so this proves
correctness, not speed), or with one process per GPU where there are several GPUs. Skipped
without a GPU and the compiled extension."""
import os

import pytest
import torch
import torch.distributed as dist
from gpu_world import ENV, GPU_MARKS

import torch_swiftep as ts
from torch_swiftep import testing
from torch_swiftep.launch import rank_gpu, run_world

pytestmark = GPU_MARKS
TOKENS = [37, 0, 128, 5, 64, 1, 99, 20]


def _device(rank):
    device = torch.device("cuda", rank_gpu(rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def _case(world, seed, dtype, hidden, k, routing, fp8):
    tokens = tuple(TOKENS[(r + seed) % len(TOKENS)] for r in range(world))
    return testing.Case(seed, dtype, hidden, k, routing, 4 * world if k < 8 else 8 * world,
                        tokens, fp8)


def _cases(world):
    shapes = (
        (torch.bfloat16, 200, 1, "uniform", False),   # 400-byte rows: odd multiple of 16
        (torch.bfloat16, 7168, 8, "uniform", False),  # the DeepSeek-V3 row
        (torch.bfloat16, 1024, 2, "skewed", False),
        (torch.bfloat16, 520, 8, "holes", False),
        (torch.float32, 132, 2, "one_rank", False),
        (torch.float16, 264, 8, "holes", False),
        (torch.bfloat16, 1024, 8, "holes", True),    # FP8 x with its scales
        (torch.bfloat16, 384, 2, "skewed", True),
        (torch.bfloat16, 7168, 8, "uniform", "fused"),  # quantize_fp8=True: in the kernel
        (torch.float32, 384, 2, "holes", "fused"),
        (torch.float16, 256, 4, "skewed", "fused"),
        (torch.bfloat16, 512, 4, "duplicates", False),  # an expert twice in one token's top-k
        (torch.bfloat16, 256, 3, "duplicates", "fused"),
    )
    return [_case(world, seed, *shape)
            for seed, shape in enumerate(shapes, start=1000 * world + 1)]


def _check_case(rank, comm_cache, case, device, options):
    """Both schedules of one case; one Communicator per shape, reused across cases (windows
    of max(TOKENS) tokens per rank). Odd seeds: zero-copy combine. options: more CommConfig
    fields (dispatch_fanout, combine_partials)."""
    key = (case.hidden, case.experts, case.topk, case.dtype)
    if key not in comm_cache:
        cfg = case.config(max_tokens_per_rank=max(TOKENS), ll_max_tokens_per_rank=max(TOKENS),
                          num_sms=3, timeout_s=60, **options)
        comm_cache[key] = ts.Communicator(dist.group.WORLD, cfg, device=device)
    return testing.run_step(comm_cache[key], rank, testing.expected(case),
                            zero_copy=case.seed % 2 == 1, device=device)


def _all_cases(rank, world, options=None):
    options = options or {}
    device = _device(rank)
    cache, errors = {}, []
    for case in _cases(world):
        errors += _check_case(rank, cache, case, device, options)
    # consecutive calls reuse the windows with no barrier in between
    for case in _cases(world)[:3]:
        again = _case(world, case.seed + 50, case.dtype, case.hidden, case.topk, case.routing,
                      case.fp8)
        errors += _check_case(rank, cache, again, device, options)
    return errors


@pytest.mark.parametrize("world", [2, 4, 8])
def test_cuda_matches_reference(world):
    errors = run_world(world, _all_cases, env=ENV, timeout_s=600)
    flat = [e for per_rank in errors for e in per_rank]
    assert not flat, "\n".join(flat[:20])


@pytest.mark.parametrize("world", [2, 3])
def test_dispatch_fanout_matches_reference(world):
    """dispatch_fanout: a token's row crosses once per remote rank and is copied into its other
    rows there; every case of the reference test, the same bits (large calls send whole tokens
    and fan out, small ones one slot per unit and write every row)."""
    errors = run_world(world, _all_cases, {"dispatch_fanout": True}, env=ENV, timeout_s=600)
    flat = [e for per_rank in errors for e in per_rank]
    assert not flat, "\n".join(flat[:20])


@pytest.mark.parametrize("options", [{"combine_partials": True},
                                     {"combine_partials": True, "dispatch_fanout": True}])
@pytest.mark.parametrize("world", [2, 3])
def test_combine_partials_matches_reference(world, options):
    """combine_partials: owners push one partial per (token, owner); every case of the reference
    test within the combine's tolerance (the CPU backend's test checks the rank order's bits)."""
    errors = run_world(world, _all_cases, options, env=ENV, timeout_s=600)
    flat = [e for per_rank in errors for e in per_rank]
    assert not flat, "\n".join(flat[:20])


def _reported_error(comm) -> str:
    """The SwiftepError a rank's queued calls reported, as text ("no error" if none)."""
    try:
        comm.check()
    except ts.SwiftepError as e:
        return str(e)
    return "no error"


def _missing_rank(rank, world):
    device = _device(rank)
    cfg = ts.CommConfig(num_experts=8, hidden=256, num_topk=2, max_tokens_per_rank=16,
                        timeout_s=2.0)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    if rank == 1:
        import time

        time.sleep(cfg.timeout_s + 5)  # alive (its workspace mapped) but never calls dispatch
        return "absent"
    x = torch.randn(16, 256, device=device).bfloat16()
    idx = torch.randint(0, 8, (16, 2), device=device)
    w = torch.rand(16, 2, device=device)
    comm.dispatch(x, idx, w)
    return _reported_error(comm)


def test_missing_rank_times_out_with_its_name():
    results = run_world(2, _missing_rank, env=ENV, timeout_s=120)
    assert results[1] == "absent"
    assert "timed out waiting for rank 1" in results[0], results[0]


def _overflow(rank, world):
    device = _device(rank)
    cfg = ts.CommConfig(num_experts=4, hidden=256, num_topk=2, max_tokens_per_rank=64,
                        capacity=40, timeout_s=30)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    x = torch.randn(64, 256, device=device).bfloat16()
    idx = torch.tensor([[0, 1]] * 64, device=device)  # 128 rows for rank 0 from each source
    w = torch.rand(64, 2, device=device)
    comm.dispatch(x, idx, w)
    return _reported_error(comm)


def test_capacity_overflow_is_reported_on_every_rank():
    results = run_world(2, _overflow, env=ENV, timeout_s=120)
    for r in results:
        assert "capacity overflow: rank 0 would receive 256 rows, more than capacity=40" in r, r


def _bad_index(rank, world):
    device = _device(rank)
    cfg = ts.CommConfig(num_experts=4, hidden=256, num_topk=2, max_tokens_per_rank=8)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    x = torch.randn(8, 256, device=device).bfloat16()
    idx = torch.zeros(8, 2, dtype=torch.long, device=device)
    idx[3, 1] = 17
    comm.dispatch(x, idx, torch.rand(8, 2, device=device))
    return _reported_error(comm)


def test_out_of_range_index_is_reported():
    results = run_world(2, _bad_index, env=ENV, timeout_s=120)
    for r in results:
        assert "topk_idx[3, 1] = 17 is out of range" in r, r


def _graph_replay(rank, world):
    """A decode step captured once, replayed with new routing every time."""
    from torch_swiftep.moe import ExpertParallelMoE, dense_reference

    device = _device(rank)
    cfg = ts.CommConfig(num_experts=4 * world, hidden=256, num_topk=4, max_tokens_per_rank=32,
                        ll_max_tokens_per_rank=32, timeout_s=60)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    layer = ExpertParallelMoE(comm, 128, low_latency=True)
    static_x = torch.zeros(24, 256, device=device, dtype=torch.bfloat16)
    layer(static_x)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    errors = []
    for step in range(4):
        # all ranks draw every rank's inputs, so each can build the unsharded reference
        xs = [torch.randn(24, 256, generator=torch.Generator().manual_seed(100 * step + r))
              .bfloat16() for r in range(world)]
        static_x.copy_(xs[rank].to(device))
        if step == 2:
            static_x[5] = 0  # a token the router still routes: zeros in, zeros out
        graph.replay()
        torch.cuda.synchronize()
        comm.check()
        want = dense_reference(_all_layers(comm, world, layer), static_x)
        msg = testing.close(static_y, want, torch.bfloat16)
        if msg:
            errors.append(f"rank {rank} replay {step}: {msg}")
    from torch._dynamo.utils import counters

    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x = torch.randn(24, 256, device=device).bfloat16()
        got = compiled(x).clone()
        msg = testing.close(got, layer(x), torch.bfloat16)
        if msg:
            errors.append(f"rank {rank} reduce-overhead call {step}: {msg}")
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    if skips:
        errors.append(f"rank {rank}: inductor skipped CUDA graphs {skips} time(s)")
    return errors


def _all_layers(comm, world, layer):
    """Every rank's shard rebuilt locally (same seeds) for the dense reference."""
    from torch_swiftep.moe import ExpertParallelMoE

    class _Shard:
        def __init__(self, r):
            self.rank, self.world_size, self.config = r, world, comm.config
            self.num_local_experts, self.device = comm.num_local_experts, comm.device

    return [layer if r == comm.rank
            else ExpertParallelMoE(_Shard(r), 128, low_latency=layer.low_latency)
            for r in range(world)]


def test_cuda_graph_replay_and_reduce_overhead():
    results = run_world(2, _graph_replay, env=ENV, timeout_s=600)
    flat = [e for r in results for e in r]
    assert not flat, "\n".join(flat)


def _throughput_layer(rank, world):
    """The throughput layer eager (the experts' output copied into the combine window) and
    under torch.compile (combine stages the experts' own tensor), against the dense layer."""
    from torch_swiftep.moe import ExpertParallelMoE, dense_reference

    device = _device(rank)
    cfg = ts.CommConfig(num_experts=4 * world, hidden=256, num_topk=4, max_tokens_per_rank=32,
                        timeout_s=60)
    layer = ExpertParallelMoE(ts.Communicator(dist.group.WORLD, cfg, device=device), 128)
    compiled = torch.compile(layer, fullgraph=True)
    errors = []
    for step, run in enumerate((layer, layer, compiled, compiled)):
        gen = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(17 + 5 * step, 256, generator=gen).bfloat16().to(device)
        got = run(x)
        layer.comm.check()
        want = dense_reference(_all_layers(layer.comm, world, layer), x)
        msg = testing.close(got, want, torch.bfloat16)
        if msg:
            errors.append(f"rank {rank} step {step} ({'compiled' if step > 1 else 'eager'}): "
                          f"{msg}")
    return errors


def test_throughput_layer_eager_and_compiled():
    results = run_world(2, _throughput_layer, env=ENV, timeout_s=600)
    flat = [e for r in results for e in r]
    assert not flat, "\n".join(flat)


def test_emulated_world_in_one_process():
    """All ranks in one process, on their own streams, as the benchmark runs them."""
    from torch_swiftep.bench.emulated_world import EmulatedWorld
    from torch_swiftep.bench.timing import graph_ms

    w = EmulatedWorld(4, 300, 7168, 8, 64, torch.bfloat16, torch.device("cuda"), seed=3,
                      routing="holes")
    _, handles = graph_ms(w.dispatch_step(4), iters=3)
    w.fill_combine_windows(handles)
    _, pairs = graph_ms(w.dispatch_combine_step(4), iters=3)
    torch.cuda.synchronize()
    errors = w.check(pairs, range(4))
    assert not errors, "\n".join(errors[:10])


if os.environ.get("SWIFTEP_GPU_SMALL_CASE"):
    # compute-sanitizer entry point: scripts/gpu_round.sh runs this file's small case alone
    def test_small_case_for_sanitizers():
        from torch_swiftep.bench.emulated_world import EmulatedWorld
        from torch_swiftep.bench.timing import fork_join

        w = EmulatedWorld(2, 16, 256, 2, 8, torch.bfloat16, torch.device("cuda"), seed=1,
                          ll_tokens=16)
        w.fill_combine_windows(w.dispatch_step(2)())
        pairs = w.dispatch_combine_step(2)()
        torch.cuda.synchronize()
        assert not w.check(pairs, range(2))
        # low latency with in-kernel FP8 quantization: (token, slot) units (3 SMs: 24 warps for
        # 16 tokens), whole-token units (1 SM: 8 warps), and, in a 2-token world with 2 KB rows,
        # row chunks of each pair (8 SMs: 64 warps for 4 pairs)
        small = EmulatedWorld(2, 2, 1024, 2, 8, torch.bfloat16, torch.device("cuda"), seed=2,
                              ll_tokens=2)
        for world, sms in ((w, 3), (w, 1), (small, 8)):
            def dispatch(r, world=world, sms=sms):
                return world.comms[r].low_latency_dispatch(
                    world.xs[r], world.idx[r], world.w[r], quantize_fp8=True, num_sms=sms)

            def call(r, world=world, sms=sms):
                h = dispatch(r)
                comm = world.comms[r]
                return h, comm.low_latency_combine(comm.low_latency_combine_buffer(), h,
                                                   num_sms=sms)
            world.fill_combine_windows(
                fork_join([(lambda r=r: dispatch(r)) for r in range(2)], world.streams))
            pairs = fork_join([(lambda r=r: call(r)) for r in range(2)], world.streams)
            torch.cuda.synchronize()
            errors = world.check(pairs, range(2), fp8=True)
            assert not errors, errors[:5]


def _overlap(rank, world):
    """Communicator.start: dispatch/combine on the side stream while the caller's stream runs
    a GEMM; results equal the reference, eagerly and inside a captured CUDA graph."""
    device = _device(rank)
    tokens = 48
    case = testing.Case(77, torch.bfloat16, 512, 4, "holes", 4 * world, (tokens,) * world)
    cfg = case.config(timeout_s=60)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    exp = testing.expected(case)
    x, idx, w, _ = exp.rank_inputs(rank, device)
    a = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)

    def step():
        pending = comm.start(comm.low_latency_dispatch, x, idx, w)
        busy = a @ a  # the caller's stream keeps computing meanwhile
        handle = pending.wait()
        out = comm.low_latency_combine_buffer()
        out.copy_(testing.expert_output(handle, out.dtype))
        y = comm.start(comm.low_latency_combine, out, handle).wait()
        return handle, y, busy

    handle, y, _ = step()
    torch.cuda.synchronize()
    comm.check()
    errors = [f"eager: {e}" for e in testing.check_step(rank, exp, handle, y)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        handle, y, _ = step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    comm.check()
    errors += [f"graph: {e}" for e in testing.check_step(rank, exp, handle, y)]
    return errors


def test_overlap_with_start_and_wait():
    results = run_world(2, _overlap, env=ENV, timeout_s=300)
    flat = [e for r in results for e in r]
    assert not flat, "\n".join(flat)


def _ll_graph_bit_exact(rank, world):
    """Low-latency dispatch captured once, replayed with new routing (with -1 entries) and new
    tokens every time: every replay bit-identical to the reference."""
    device = _device(rank)
    experts, hidden, k, tokens = 4 * world, 384, 4, 40
    cfg = ts.CommConfig(num_experts=experts, hidden=hidden, num_topk=k,
                        max_tokens_per_rank=tokens, ll_max_tokens_per_rank=tokens, timeout_s=60)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    static_x = torch.zeros(tokens, hidden, dtype=torch.bfloat16, device=device)
    static_idx = torch.full((tokens, k), -1, dtype=torch.long, device=device)
    static_w = torch.zeros(tokens, k, device=device)
    comm.low_latency_dispatch(static_x, static_idx, static_w)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        handle = comm.low_latency_dispatch(static_x, static_idx, static_w)
    errors = []
    for step, routing in enumerate(("holes", "skewed", "uniform", "holes")):
        exp = testing.expected(testing.Case(500 + step, torch.bfloat16, hidden, k, routing,
                                            experts, (tokens,) * world))
        x, idx, w, _ = exp.rank_inputs(rank)
        static_x.copy_(x)
        static_idx.copy_(idx)
        static_w.copy_(w)
        graph.replay()
        torch.cuda.synchronize()
        comm.check()
        ref, ref_rows = exp.low_latency(tokens)
        errors += [f"replay {step} ({routing}): {e}" for e in
                   testing.compare_low_latency(rank, handle, ref[rank], ref_rows[rank])]
        # A low-latency dispatch writes into the owners' windows as soon as the lower ranks'
        # counts are in; in a model the combine between two dispatches keeps a fast rank from
        # overwriting a window still being read. Here the host reads the window, so wait.
        dist.barrier()
    return errors


def test_low_latency_graph_replays_bit_exact():
    results = run_world(2, _ll_graph_bit_exact, env=ENV, timeout_s=300)
    flat = [e for r in results for e in r]
    assert not flat, "\n".join(flat)


def _cuda_op_errors(rank, world):
    """C++ checks of the CUDA ops reach Python as exceptions. Runs in a child process, so a
    crash fails the test instead of taking pytest down."""
    device = _device(rank)
    problems = []
    inp = testing.world_inputs(11, [333], 8, 64, 8, torch.float32, "holes")
    bad = inp.topk_idx[0].clone()
    bad[5, 2] = 64
    try:
        torch.ops.swiftep.dispatch_layout(bad.to(device), 64, 8)
        problems.append("dispatch_layout accepted topk_idx value 64 with num_experts=64")
    except IndexError as e:  # the CPU backend's class for the same input
        if "topk_idx has values in [-1, 64]" not in str(e):
            problems.append(f"dispatch_layout: unexpected message {e}")
    cfg = ts.CommConfig(num_experts=8, hidden=128, num_topk=2, max_tokens_per_rank=4,
                        ll_max_tokens_per_rank=4)
    comm = ts.Communicator(None, cfg, device=device)
    x = torch.zeros(4, 64, dtype=torch.bfloat16, device=device)  # hidden 64, not 128
    idx = torch.zeros(4, 2, dtype=torch.int64, device=device)
    w = torch.ones(4, 2, device=device)
    try:  # a check that runs with the op's device guard alive
        torch.ops.swiftep.low_latency_dispatch(x, None, idx, w, comm.workspace, comm.peer_ptrs,
                                               "", comm.plan.as_list(), 4)
        problems.append("low_latency_dispatch accepted x of hidden 64 for hidden=128")
    except ValueError as e:
        if "x must be [num_tokens, 128]" not in str(e):
            problems.append(f"low_latency_dispatch: unexpected message {e}")
    try:  # through the wrapper: the contract's check, the same class and text as on CPU
        comm.low_latency_dispatch(x, idx, w)
        problems.append("Communicator.low_latency_dispatch accepted x of hidden 64")
    except ValueError as e:
        if "x has hidden=64" not in str(e):
            problems.append(f"Communicator.low_latency_dispatch: unexpected message {e}")
    return problems


def test_dispatch_layout_matches_cpu_and_rejects_bad_indices():
    inp = testing.world_inputs(11, [333], 8, 64, 8, torch.float32, "holes")
    idx = inp.topk_idx[0]
    got = torch.ops.swiftep.dispatch_layout(idx.cuda(), 64, 8)
    want = torch.ops.swiftep.dispatch_layout(idx, 64, 8)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    with pytest.raises(TypeError, match="topk_idx must be int64 or int32"):
        torch.ops.swiftep.dispatch_layout(idx.cuda().float(), 64, 8)  # a C++ check, raised
    problems = run_world(1, _cuda_op_errors, env=ENV, timeout_s=120)[0]
    assert not problems, problems
