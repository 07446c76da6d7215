"""combine(symmetric=True) on the CUDA backend: the experts' output allocated in
Communicator.expert_output_pool() (torch's symmetric memory pool) and read in place on every
owner, no staging copy. Ranks are processes sharing one GPU (tests/gpu_world.py), as in
test_gpu.py: results against testing's reference and bit for bit against the plain combine of
the same tensor, a pool segment freed and allocated again step after step (the rendezvous
cache), a captured CUDA graph replayed with new inputs, the errors for a tensor outside the pool
or with rows the kernel cannot read, and a rank left alone on the symmetric path. Skipped
without a GPU and the compiled extension."""
import time

import pytest
import torch
import torch.distributed as dist
from gpu_world import ENV, GPU_MARKS

import torch_swiftep as ts
from torch_swiftep import testing
from torch_swiftep.launch import rank_gpu, run_world

pytestmark = GPU_MARKS
TOKENS = [37, 0, 128, 5, 64, 1, 99, 20]
TIMEOUT_S = 3.0  # the lonely-rank test: short, so a bounded wait ends quickly
SHAPES = (  # (dtype, hidden, k, routing, fp8): every row a multiple of 16 bytes
    (torch.bfloat16, 200, 1, "uniform", False),   # 400-byte rows: odd multiple of 16
    (torch.float16, 264, 8, "holes", False),
    (torch.bfloat16, 7168, 8, "uniform", False),  # the DeepSeek-V3 row
    (torch.float32, 132, 2, "skewed", False),     # 528-byte rows
    (torch.bfloat16, 512, 4, "duplicates", False),  # an expert twice in one token's top-k
    (torch.float32, 384, 2, "one_rank", False),
    (torch.bfloat16, 384, 2, "skewed", True),     # FP8 x with its scales, bf16 expert output
    (torch.float32, 384, 2, "holes", "fused"),    # bf16 output rows narrower than the window's
)


def _device(rank):
    device = torch.device("cuda", rank_gpu(rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def _tokens(world, shift):
    """Per rank token counts; shift 0 and 1 give a rank with no tokens (rank 1, rank 0)."""
    return tuple(TOKENS[(r + shift) % len(TOKENS)] for r in range(world))


def _cases(world):
    return [testing.Case(2000 * world + i, dtype, hidden, k, routing,
                         4 * world if k < 8 else 8 * world, _tokens(world, i), fp8)
            for i, (dtype, hidden, k, routing, fp8) in enumerate(SHAPES)]


def _pooled(comm, rows, spare_rows=0):
    """A copy of rows in a tensor allocated inside the pool, as a grouped GEMM's output would
    be; only the allocation runs in the context. spare_rows > 0: the rows are the start of a
    larger allocation."""
    with comm.expert_output_pool():
        out = torch.empty((rows.size(0) + spare_rows, *rows.shape[1:]), dtype=rows.dtype,
                          device=rows.device)
    return out[:rows.size(0)].copy_(rows)


def _symmetric_step(comms, rank, exp, device, spare_rows=0):
    """(errors, out): dispatch, the fake expert into a fresh pool tensor, combine(symmetric=True)
    against the reference; then the same rows through the plain combine, bit for bit. comms:
    (symmetric, plain): a communicator whose ranks agreed on symmetric combines refuses plain
    ones, so the plain combine (dispatch of the same inputs, the same rows) has its own."""
    comm, plain_comm = comms
    x, idx, w, scales = exp.rank_inputs(rank, device)
    kwargs = dict(x_scales=scales, quantize_fp8=exp.case.fused)
    handle = comm.dispatch(x, idx, w, **kwargs)
    out = _pooled(comm, testing.expert_output(handle, exp.case.out_dtype), spare_rows)
    y = comm.combine(out, handle, symmetric=True)
    comm.check()
    errors = [f"symmetric: {e}" for e in testing.check_step(rank, exp, handle, y)]
    handle = plain_comm.dispatch(x, idx, w, **kwargs)
    plain = plain_comm.combine(out, handle)
    plain_comm.check()
    msg = testing.same_bits(plain, y.cpu())
    if msg:
        errors.append(f"rank {rank}: plain combine of the same tensor differs: {msg}")
    return [f"{exp.case}: {e}" for e in errors], out


def _reuse(rank, world, comms, device):
    """Steps on one communicator, each with a fresh pool tensor of its own size (the previous
    one freed first); at step 3 the previous one stays alive, so two are alive at once. The
    ranks' pools pick their blocks by their own addresses, so the ranks' tensors can sit in
    different reserved segments, or none (staged: torch's small-pool tensors, under 1 MiB, may
    land in a small segment of their own): each combine must still read every peer's rows,
    whatever mix of in-place and staged owners it meets. At step 4 rank 0's rows are the start
    of an allocation above the small pool's sizes: a reserved large segment must hold it, read
    in place."""
    errors, kept = [], None
    tables = comms[0]._segments
    for step, routing in enumerate(("uniform", "holes", "skewed", "duplicates", "uniform",
                                    "holes")):
        case = testing.Case(3000 * world + step, torch.bfloat16, 512, 4, routing, 4 * world,
                            _tokens(world, step + 3))
        large = step == 4 and rank == 0
        before = tables.staged_calls
        found, out = _symmetric_step(comms, rank, testing.expected(case), device,
                                     spare_rows=4096 if large else 0)
        errors += [f"reuse step {step}: {e}" for e in found]
        if large and tables.staged_calls != before:
            where = tables._locate(out.data_ptr(), out.numel() * out.element_size())
            errors.append(f"rank {rank}: reuse step {step}: a large pool tensor was staged "
                          f"(its segment: {where}; reserved: "
                          f"{[(hex(b), n) for b, n, _ in tables._segments]})")
        kept = out if step == 2 else None
        del out
    del kept
    return errors


def _all_cases(rank, world):
    device = _device(rank)
    comms, errors = {}, []
    for case in _cases(world):
        key = (case.hidden, case.experts, case.topk, case.dtype)
        if key not in comms:
            cfg = case.config(max_tokens_per_rank=max(TOKENS),
                              ll_max_tokens_per_rank=max(TOKENS), num_sms=3, timeout_s=60)
            comms[key] = tuple(ts.Communicator(dist.group.WORLD, cfg, device=device)
                               for _ in range(2))  # (symmetric, plain)
        errors += _symmetric_step(comms[key], rank, testing.expected(case), device)[0]
    return errors + _reuse(rank, world, comms[(512, 4 * world, 4, torch.bfloat16)], device)


@pytest.mark.parametrize("world", [2, 3])
def test_symmetric_combine_matches_reference_and_plain_combine(world):
    errors = run_world(world, _all_cases, env=ENV, timeout_s=600)
    flat = [e for per_rank in errors for e in per_rank]
    assert not flat, "\n".join(flat[:20])


def _graph(rank, world):
    """dispatch + the fake expert into the pool tensor + symmetric combine, captured once after
    an eager warm-up and replayed with new inputs: each replay equal to the reference and bit
    for bit to the eager step on the same inputs. The pool tensor is allocated ONCE, before
    capture, and the graph only copies into it: an allocation during capture goes to the
    graph's private pool (torch.cuda.graph routes the capture stream's allocations there), and
    a segment's first rendezvous is a host collective that must not run under capture."""
    device = _device(rank)
    tokens, hidden, k, experts = 40, 384, 4, 4 * world
    cfg = ts.CommConfig(num_experts=experts, hidden=hidden, num_topk=k,
                        max_tokens_per_rank=tokens, timeout_s=60)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    static_x = torch.zeros(tokens, hidden, dtype=torch.bfloat16, device=device)
    static_idx = torch.full((tokens, k), -1, dtype=torch.long, device=device)
    static_w = torch.zeros(tokens, k, device=device)
    with comm.expert_output_pool():
        out = torch.empty(comm.plan.capacity, hidden, dtype=torch.bfloat16, device=device)

    def load(step, routing):
        exp = testing.expected(testing.Case(600 + step, torch.bfloat16, hidden, k, routing,
                                            experts, (tokens,) * world))
        for static, fresh in zip((static_x, static_idx, static_w), exp.rank_inputs(rank)):
            static.copy_(fresh)
        return exp

    def step():
        handle = comm.dispatch(static_x, static_idx, static_w)
        out.copy_(testing.expert_output(handle, torch.bfloat16))
        return handle, comm.combine(out, handle, symmetric=True)

    exp = load(0, "uniform")
    handle, y = step()  # warm-up: the first symmetric combine agrees here, eagerly
    comm.check()
    errors = [f"eager warm-up: {e}" for e in testing.check_step(rank, exp, handle, y)]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        handle, static_y = step()
    for i, routing in enumerate(("holes", "skewed", "duplicates", "uniform")):
        exp = load(i + 1, routing)
        graph.replay()
        torch.cuda.synchronize()
        comm.check()
        errors += [f"replay {i} ({routing}): {e}"
                   for e in testing.check_step(rank, exp, handle, static_y)]
        replayed = static_y.cpu()
        eager_y = step()[1]
        comm.check()
        msg = testing.same_bits(eager_y, replayed)
        if msg:
            errors.append(f"rank {rank} replay {i} ({routing}): differs from eager: {msg}")
    return errors


def test_symmetric_combine_in_a_cuda_graph():
    results = run_world(2, _graph, env=ENV, timeout_s=300)
    flat = [e for r in results for e in r]
    assert not flat, "\n".join(flat)


def _error_of(fn) -> tuple[bool, str]:
    """(raised a SwiftepError, "Class: text" or "no error")."""
    try:
        fn()
    except Exception as exc:
        return isinstance(exc, ts.SwiftepError), f"{type(exc).__name__}: {exc}"
    return False, "no error"


def _dispatched(rank, world, dtype, hidden, seed, timeout_s=20.0):
    """A fresh communicator and its dispatch of 16 tokens per rank."""
    device = _device(rank)
    case = testing.Case(seed, dtype, hidden, 2, "uniform", 4 * world, (16,) * world)
    comm = ts.Communicator(dist.group.WORLD, case.config(timeout_s=timeout_s), device=device)
    x, idx, w, _ = testing.expected(case).rank_inputs(rank, device)
    dist.barrier()  # the ranks reach the dispatch together: well within a short timeout_s
    return comm, comm.dispatch(x, idx, w)


def _bad_tensors(rank, world):
    """Every rank passes the same bad tensor, so no rank waits for another. A tensor from
    outside the pool: refused where torch can tell (is_symm_mem_tensor), else staged."""
    comm, handle = _dispatched(rank, world, torch.bfloat16, 256, seed=31)
    outside = testing.expert_output(handle, torch.bfloat16).clone()  # not from the pool
    plain_comm, plain_handle = _dispatched(rank, world, torch.bfloat16, 256, seed=31)
    plain = plain_comm.combine(outside, plain_handle).cpu()
    try:
        y = comm.combine(outside, handle, symmetric=True)
        comm.check()
        not_pooled = (f"staged {comm._segments.staged_calls} time(s); "
                      f"{testing.same_bits(plain, y.cpu()) or 'equal to the plain combine'}")
    except Exception as exc:  # noqa: BLE001 - the message is the result
        not_pooled = f"{type(exc).__name__}: {exc}"
    # fp32 windows of hidden 12 (48-byte rows) and a pool tensor of fp16 rows: 24 bytes, not
    # a multiple of the kernel's 16-byte vectors
    comm, handle = _dispatched(rank, world, torch.float32, 12, seed=32)
    out = _pooled(comm, testing.expert_output(handle, torch.float16))
    misaligned = _error_of(lambda: comm.combine(out, handle, symmetric=True))[1]
    return not_pooled, misaligned


def test_symmetric_combine_rejects_bad_tensors_on_every_rank():
    for not_pooled, misaligned in run_world(2, _bad_tensors, env=ENV, timeout_s=300):
        import torch.distributed._symmetric_memory as symm_mem

        if hasattr(symm_mem, "is_symm_mem_tensor"):
            assert not_pooled.startswith("ValueError: ") and "expert_output_pool" in not_pooled, \
                not_pooled
        else:
            assert not_pooled == "staged 1 time(s); equal to the plain combine", not_pooled
        assert misaligned.startswith("ValueError: ") and "expert_out" in misaligned, misaligned


def _one_rank_symmetric(rank, world):
    """Rank 0 calls combine(symmetric=True), rank 1 the plain combine, on a segment never
    rendezvoused before. Neither rank leaves before the other has its answer (the store), so
    an error never comes from a peer's process exiting."""
    comm, handle = _dispatched(rank, world, torch.bfloat16, 256, seed=41, timeout_s=TIMEOUT_S)
    out = _pooled(comm, testing.expert_output(handle, torch.bfloat16))  # the pool stays symmetric
    store = dist.distributed_c10d._get_default_store()
    start = time.monotonic()
    try:
        found = _error_of(lambda: (comm.combine(out, handle, symmetric=rank == 0), comm.check()))
        took = time.monotonic() - start
    finally:
        store.set(f"symmetric_test_done_{rank}", "1")
    store.wait([f"symmetric_test_done_{1 - rank}"])
    return found + (took,)


def test_a_rank_alone_on_the_symmetric_path_is_named_within_the_timeout():
    # group_timeout_s below run_world's: an unbounded rendezvous would surface as a store
    # timeout (not a SwiftepError) before the world is killed, and fail the asserts below
    results = run_world(2, _one_rank_symmetric, env=ENV, timeout_s=300, group_timeout_s=120)
    (sym_swiftep, sym_msg, sym_took), (plain_swiftep, plain_msg, _) = results
    assert sym_swiftep and "rank 1" in sym_msg, sym_msg
    assert sym_took < TIMEOUT_S + 20, f"the symmetric rank waited {sym_took:.1f} s: {sym_msg}"
    # the plain rank cannot finish either (rank 0 never staged its rows): named, not garbage
    assert plain_swiftep and "rank 0" in plain_msg, plain_msg
