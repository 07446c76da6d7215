"""combine(symmetric=True) and swiftep::combine_symmetric on the CPU backend, and the host side of
the CUDA path (the segment table: the bounded arrival, the rendezvous, the reserved segments, the
lookup) with torch's
rendezvous stood in for, since this machine has no GPU."""
import types

import pytest
import torch
import torch.distributed as dist
from fault_catalogue import caught as _caught

import torch_swiftep as ts
from torch_swiftep import symmetric, testing
from torch_swiftep.launch import run_world
from torch_swiftep.ops import BY_NAME

E, H, K, T = 8, 48, 3, 12


def _cases(world):
    experts = 12 if world == 3 else 8
    tokens = (5, 0, 17)[:world]
    return [testing.Case(31 + world, torch.bfloat16, 48, 3, "holes", experts, tokens),
            testing.Case(41 + world, torch.float32, 36, 2, "duplicates", experts, tokens[::-1]),
            testing.Case(51 + world, torch.bfloat16, 256, 2, "skewed", experts, tokens, "fused")]


def _symmetric_equals_combine(rank, world, ranks_per_node):
    errors = []
    for case in _cases(world):
        comm = ts.Communicator(dist.group.WORLD, case.config(ranks_per_node=ranks_per_node))
        exp = testing.expected(case, ranks_per_node=ranks_per_node)
        x, idx, w, scales = exp.rank_inputs(rank)
        handle = comm.dispatch(x, idx, w, x_scales=scales, quantize_fp8=case.fused)
        with comm.expert_output_pool():
            out = testing.expert_output(handle, case.out_dtype)
        y = comm.combine(out, handle)  # first: once symmetric, a communicator stays so
        y_symmetric = comm.combine(out, handle, symmetric=True)
        msg = testing.same_bits(y_symmetric, y)
        if msg:
            errors.append(f"{case}: rank {rank}: symmetric combine != combine: {msg}")
        errors += [f"{case}: {e}" for e in testing.check_step(rank, exp, handle, y_symmetric)]
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("world, ranks_per_node", [(2, None), (3, None), (3, 1)])
def test_symmetric_combine_equals_combine_bit_for_bit(world, ranks_per_node):
    results = run_world(world, _symmetric_equals_combine, ranks_per_node, timeout_s=240)
    errors = [e for per_rank in results for e in per_rank]
    assert not errors, "\n".join(errors[:20])


def _mixed_after_symmetric(rank, world):
    """After a first symmetric combine on every rank, ranks mix plain and symmetric combines:
    each result is the reference's."""
    case = _cases(world)[0]
    comm = ts.Communicator(dist.group.WORLD, case.config(timeout_s=20))
    exp = testing.expected(case)
    x, idx, w, _ = exp.rank_inputs(rank)
    handle = comm.dispatch(x, idx, w)
    out = testing.expert_output(handle, case.out_dtype)
    comm.combine(out, handle, symmetric=True)  # every rank: the path is engaged
    errors = []
    for mode in (rank == 0, False):
        handle = comm.dispatch(x, idx, w)
        y = comm.combine(out, handle, symmetric=mode)
        errors += testing.check_step(rank, exp, handle, y)
    return errors


@pytest.mark.slow
def test_plain_and_symmetric_combines_mix_after_the_first_symmetric_one():
    errors = [e for per_rank in run_world(2, _mixed_after_symmetric, timeout_s=120)
              for e in per_rank]
    assert not errors, "\n".join(errors)


# ------------------------------------------------------------------- one process, the op itself
def _comm_and_args():
    comm = ts.Communicator(None, ts.CommConfig(num_experts=E, hidden=H, num_topk=K,
                                               max_tokens_per_rank=T))
    inp = testing.world_inputs(7, [9], H, E, K, torch.bfloat16, "holes")
    handle = comm.dispatch(inp.xs[0], inp.topk_idx[0], inp.topk_weights[0])
    out = testing.expert_output(handle, torch.bfloat16)
    state = (comm.workspace, comm.peer_ptrs, comm.group_name, comm.plan.as_list(), 4)
    rest = (handle.topk_idx, handle.topk_weights, handle.token_rows, handle.expert_offsets, *state)
    return comm, handle, out, rest


def test_world_of_one_equals_combine_and_the_pool_is_a_no_op_on_cpu():
    comm, handle, out, rest = _comm_and_args()
    with comm.expert_output_pool() as pool:
        assert pool is None
    plain = comm.combine(out, handle)
    y = comm.combine(out, handle, symmetric=True)
    assert testing.same_bits(y, plain) is None
    direct = torch.ops.swiftep.combine_symmetric(out, torch.zeros(1, 1, dtype=torch.int64), 0, 0,
                                                 *rest)
    assert testing.same_bits(direct, y) is None
    # from now on a plain combine is the symmetric op with its rows staged: the same result
    assert testing.same_bits(comm.combine(out, handle), y) is None


TABLE = torch.zeros(2, 1, dtype=torch.int64)


@pytest.mark.parametrize("table, exc, pattern", [
    ((TABLE.int(), 0, 0), TypeError, r"segment_bases must have dtype .*torch.int32"),
    ((torch.zeros(2, 2, dtype=torch.int64), 0, 0), ValueError,
     r"segment_bases has shape \(2, 2\), must be \[segments, world_size=1\]"),
    ((torch.zeros(1, dtype=torch.int64), 0, 0), ValueError, r"segment_bases must have 2 dim"),
    ((TABLE.to("meta"), 0, 0), ValueError, r"segment_bases is on meta"),
    (([0], 0, 0), TypeError, r"segment_bases must be a torch.Tensor"),
    ((TABLE, 2, 0), ValueError, r"segment must be -1 or in \[0, 2\) .*got 2"),
    ((TABLE, -2, 0), ValueError, r"segment must be -1 or in \[0, 2\) .*got -2"),
    ((TABLE, 0, 8), ValueError, r"segment_offset must be a non-negative multiple of 16, got 8"),
    ((TABLE, 0.5, 0), TypeError, r"segment must be an int, got float"),
])
def test_bad_segment_table_names_the_argument(table, exc, pattern):
    comm, _, out, rest = _comm_and_args()
    with pytest.raises(exc, match=pattern):
        BY_NAME["combine_symmetric"].check(out, *table, *rest)
    if isinstance(table[1], int):  # the schema refuses a float before any check runs
        with pytest.raises(exc, match=pattern):  # the Communicator's path: checks, then the op
            comm._call("combine_symmetric", out, *table, *rest)


def test_symmetric_flag_must_be_a_bool():
    comm, handle, out, _ = _comm_and_args()
    with pytest.raises(TypeError, match="symmetric must be a bool, got 1"):
        comm.combine(out, handle, symmetric=1)


def test_combine_checks_apply_to_the_symmetric_path():
    comm, handle, out, _ = _comm_and_args()
    with pytest.raises(ValueError, match=r"expert_out has 3 rows"):
        comm.combine(out[:3], handle, symmetric=True)
    assert comm._segments.engaged_at is None  # a refused first call engages nothing
    comm.dispatch(torch.randn(4, H).bfloat16(), torch.zeros(4, K, dtype=torch.long),
                  torch.ones(4, K))
    with pytest.raises(ValueError, match=r"stale handle"):
        comm.combine(out, handle, symmetric=True)


def test_compiled_symmetric_combine_has_the_op_and_no_graph_break():
    comm, handle, out, _ = _comm_and_args()
    eager = comm.combine(out, handle, symmetric=True)

    def step(out):
        return comm.combine(out, handle, symmetric=True)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(out)
    assert explanation.graph_break_count == 0
    targets = {str(n.target) for g in explanation.graphs for n in g.graph.nodes}
    assert "swiftep.combine_symmetric" in targets, targets
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(out)
    assert testing.same_bits(compiled, eager) is None


# ------------------------------------------- the CUDA path's host side, with a stand-in rendezvous
def _stand_in_rendezvous(calls):
    """symm_mem.rendezvous over gloo: every rank's data_ptr, as buffer_ptrs would hold them."""
    def rendezvous(tensor, group_name):
        # kept alive, as a pool keeps its segments: a freed CPU block's address could come back
        # for a later tensor, which the table would then find
        calls.append(tensor)
        mine = torch.tensor([tensor.data_ptr()], dtype=torch.int64)
        ptrs = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
        dist.all_gather(ptrs, mine)
        return types.SimpleNamespace(buffer_ptrs=[int(p) for p in ptrs],
                                     buffer_size=tensor.numel())
    return rendezvous


def _stand_in(calls):
    import torch.distributed._symmetric_memory as symm_mem

    symm_mem.rendezvous = _stand_in_rendezvous(calls)
    symm_mem.is_symm_mem_tensor = lambda t: not getattr(t, "foreign", False)


def _comm(timeout_s=1.5):
    config = ts.CommConfig(num_experts=6, hidden=H, num_topk=2, max_tokens_per_rank=4,
                           timeout_s=timeout_s)
    return ts.Communicator(dist.group.WORLD, config)


def _table_protocol(rank, world):
    calls = []
    _stand_in(calls)
    comm = _comm()
    tables = comm._segments
    tables.reserve(comm)  # what the pool's first entry does on a GPU
    blocks = list(calls)  # the small block, then the large ones
    gathered = [torch.zeros(len(blocks), dtype=torch.int64) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([b.data_ptr() for b in blocks]))
    ok = (len(blocks) == 1 + symmetric.RESERVED_SEGMENTS
          and tables._bases.tolist() == torch.stack(gathered, 1).tolist()
          and all(b.numel() >= symmetric.LARGE_MIN_BYTES for b in blocks[1:]))
    # a tensor inside the second large block (as the pool would hand it out), then one outside
    inside = blocks[2][4096:4096 + 8 * H * 4].view(torch.float32).view(8, H)
    found = tables._cuda_table(comm, inside)  # the first symmetric combine: every rank agrees
    again = tables._cuda_table(comm, inside)  # no agreement from now on
    with pytest.warns(UserWarning, match=r"in none of the 3 segments .*staged"):
        outside = tables._cuda_table(comm, torch.empty(8, H))
    ok = (ok and found[0] is tables._bases and found[1:] == (2, 4096) and again[1:] == (2, 4096)
          and outside[1:] == (symmetric.STAGED_SEGMENT, 0) and tables.staged_calls == 1
          and len(calls) == len(blocks))
    # at a fresh communicator's first symmetric combine, rank 1's tensor is not the pool's:
    # it raises, the others name it at once
    comm = _comm()
    foreign = torch.empty(8, H)
    foreign.foreign = rank == 1
    rejected = _caught(lambda: comm._segments._cuda_table(comm, foreign))
    # at another's, rank 2 calls the plain combine: the others name it within timeout_s
    comm = _comm()
    missing = (_caught(lambda: comm._segments._cuda_table(comm, torch.empty(8, H)))
               if rank != 2 else None)
    dist.barrier()  # rank 0 hosts the store: it stays until every rank has its verdict
    return ok, rejected, missing, comm._broken


@pytest.mark.slow
def test_segment_table_and_the_first_combines_agreement():
    results = run_world(3, _table_protocol, timeout_s=120)
    for rank, (ok, rejected, missing, broken) in enumerate(results):
        assert ok, (rank, results[rank])
        if rank == 1:
            assert rejected[0] == "ValueError", rejected
            assert "expert_out must be allocated inside Communicator.expert_output_pool()" \
                in rejected[1] and "is in no symmetric memory allocation" in rejected[1], rejected
        else:
            assert rejected[0] == "SwiftepError", rejected
            assert "rank 1 rejected its inputs" in rejected[1], rejected
            assert rejected[2] < 1.0, rejected
        if rank == 2:
            continue
        assert missing[0] == "BrokenCommunicatorError", missing
        assert "rank 2 never arrived at combine_symmetric call 1" in missing[1], missing
        assert 1.5 <= missing[2] < 5, missing
        assert broken is not None and "combine_symmetric" in broken


def test_world_of_one_table_is_its_own_address():
    comm, _, out, _ = _comm_and_args()
    comm._segments.reserve(comm)
    inside = comm._segments._segments[1]  # (base, bytes, handle) of the first large block
    assert comm._segments._bases[:, 0].tolist() == [b for b, _, _ in comm._segments._segments]
    assert inside[1] >= symmetric.LARGE_MIN_BYTES and inside[2] is None
    with pytest.warns(UserWarning, match="staged"):  # out is no reserved block
        bases, segment, offset = comm._segments._cuda_table(comm, out)
    assert bases is comm._segments._bases and (segment, offset) == (-1, 0)
    assert symmetric.expert_output_pool(torch.device("cpu")).__enter__() is None
