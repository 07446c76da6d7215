"""The hierarchical schedule across nodes (torch_swiftep/scale_out), the code the CUDA
Communicator runs over NVSHMEM, driven here over a ThreadWorld (every rank a thread, every put a
row copy): dispatch bit for bit against the reference, combine bit for bit against
reference.combine(..., ranks_per_node=P), for 2x1, 2x2, 3x2, 2x4 and 4x2 worlds, bf16, fp32 and
FP8, uneven, skewed, empty and -1 routing; a rank that never calls is named by the others within
the bound; a capacity overflow is refused on every rank."""
import dataclasses
import threading

import pytest
import torch

from torch_swiftep import testing
from torch_swiftep.plan import default_capacity
from torch_swiftep.scale_out import (
    SIGNALS,
    Geometry,
    HierarchicalSchedule,
    LowLatencySchedule,
    ScaleOutRank,
    ThreadWorld,
)
from torch_swiftep.status import BrokenCommunicatorError, SwiftepError, SwiftepIndexError


def run_threads(world: int, per_node: int, config, fn, timeout_s: float = 60.0,
                capacity=None):
    """fn(rank, ScaleOutRank) on every rank as a thread; returns the results in rank order
    (an exception is returned, not raised)."""
    config = dataclasses.replace(config, ranks_per_node=per_node)
    tw = ThreadWorld(world, per_node, timeout_s)
    cap = capacity or default_capacity(config, world)
    ranks = []
    for r in range(world):
        g = Geometry(config, r, world, cap)
        t = tw.transport(r, g.buffer_bytes(), SIGNALS)
        ranks.append(ScaleOutRank(HierarchicalSchedule(g, t),
                                  LowLatencySchedule(g, t, torch.device("cpu"))))
    results = [None] * world

    def body(r):
        try:
            results[r] = fn(r, ranks[r])
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            results[r] = exc

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=timeout_s * 4 + 60)
        assert not th.is_alive(), "a rank thread never finished"
    return results


CASES = [  # (tokens per rank, ranks per node, dtype, hidden, topk, routing, experts, fp8)
    ((5, 0), 1, torch.bfloat16, 64, 2, "uniform", 4, False),
    ((7, 3, 0, 6), 2, torch.bfloat16, 64, 3, "holes", 8, False),
    ((4, 9, 2, 5), 2, torch.float32, 32, 4, "skewed", 16, False),
    ((6, 6, 1, 3, 8, 2), 2, torch.bfloat16, 48, 2, "duplicates", 12, False),
    ((3, 5, 0, 7, 2, 4, 6, 1), 4, torch.bfloat16, 64, 4, "uniform", 16, False),
    ((3, 5, 0, 7, 2, 4, 6, 1), 2, torch.float16, 64, 3, "one_rank", 8, False),
    ((6, 2, 5, 3), 2, torch.bfloat16, 512, 4, "holes", 8, True),
    ((2, 6, 4, 0), 2, torch.bfloat16, 512, 2, "skewed", 8, "fused"),
]


def _step(case, per_node):
    exp = testing.expected(case, ranks_per_node=per_node)

    def fn(rank, comm):
        errors = []
        # twice: every buffer is reused (epochs advance, stale metadata is ignored)
        for _ in range(2):
            errors += testing.run_step(comm, rank, exp, zero_copy=False,
                                       schedules=("throughput", "low_latency"))
            errors += _low_latency_bits(comm, rank, exp)
        return errors
    return exp, fn


def _low_latency_bits(comm, rank, exp) -> list:
    """The direct low-latency combine is the flat slot sum: reference.combine's bits."""
    x, idx, w, scales = exp.rank_inputs(rank)
    handle = comm.low_latency_dispatch(x, idx, w, x_scales=scales, quantize_fp8=exp.case.fused)
    y = comm.low_latency_combine(testing.expert_output(handle, exp.case.out_dtype), handle)
    msg = testing.same_bits(y, exp.y[rank])
    return [f"{exp.case}: rank {rank}: low_latency_combine {msg}"] if msg else []


@pytest.mark.parametrize("shape", CASES, ids=lambda s: f"w{len(s[0])}x{s[1]}-{s[5]}-{s[7]}")
def test_schedule_matches_reference(shape):
    tokens, per_node, dtype, hidden, topk, routing, experts, fp8 = shape
    case = testing.Case(seed=len(tokens) * 31 + per_node, dtype=dtype, hidden=hidden, topk=topk,
                        routing=routing, experts=experts, tokens=tokens, fp8=fp8)
    exp, fn = _step(case, per_node)
    results = run_threads(case.world, per_node, case.config(), fn)
    errors = [e for r in results for e in (r if isinstance(r, list) else [repr(r)])]
    assert not errors, "\n".join(errors[:10])


def test_combine_with_other_weights_and_a_fresh_tensor():
    """combine(topk_weights=...) at the forwarders uses the weights the source sends now."""
    case = testing.Case(seed=5, dtype=torch.bfloat16, hidden=32, topk=2, routing="uniform",
                        experts=8, tokens=(4, 3, 5, 2))
    inp = case.inputs()
    new_w = [torch.rand_like(w) for w in inp.topk_weights]
    _, rows = testing.reference.dispatch(inp.xs, inp.topk_idx, inp.topk_weights, 8)

    def fn(rank, comm):
        x, idx, w, _ = (inp.xs[rank], inp.topk_idx[rank], inp.topk_weights[rank], None)
        handle = comm.dispatch(x, idx, w)
        out = torch.randn(handle.recv_x.size(0), 32).bfloat16()
        return handle.expert_offsets, out, comm.combine(out, handle, topk_weights=new_w[rank])

    results = run_threads(4, 2, case.config(), fn)
    outs = []
    for offs, out, _ in results:
        outs.append(out[:int(offs[-1])])
    want = testing.reference.combine(outs, inp.topk_idx, new_w, rows, 8, ranks_per_node=2)
    for rank, (_, _, y) in enumerate(results):
        assert testing.same_bits(y, want[rank]) is None, rank


def test_a_rank_that_never_calls_is_named_across_the_node_boundary():
    cfg = testing.CommConfig(num_experts=8, hidden=32, num_topk=2, max_tokens_per_rank=4)

    def fn(rank, comm):
        if rank == 3:
            return "absent"
        x = torch.randn(4, 32).bfloat16()
        comm.dispatch(x, torch.randint(0, 8, (4, 2)), torch.rand(4, 2))
        return "no error"

    results = run_threads(4, 2, cfg, fn, timeout_s=0.5)
    assert results[3] == "absent"
    for rank in range(3):
        err = results[rank]
        assert isinstance(err, BrokenCommunicatorError), (rank, err)
        assert "waiting for rank 3 (node 1)" in str(err), str(err)


def test_capacity_overflow_is_refused_on_every_rank():
    cfg = testing.CommConfig(num_experts=4, hidden=32, num_topk=2, max_tokens_per_rank=8)

    def fn(rank, comm):
        idx = torch.tensor([[0, 1]] * 8)  # every token to rank 0's experts
        comm.dispatch(torch.randn(8, 32).bfloat16(), idx, torch.rand(8, 2))
        return "no error"

    for err in run_threads(4, 2, cfg, fn, capacity=20):
        assert isinstance(err, SwiftepError) and "rank 0 (node 0) would receive 32 rows" in \
            str(err), err


def test_low_latency_out_of_range_experts_are_sent_nowhere_and_reported():
    """What a CUDA graph replay cannot check on the host: check() reports it afterwards."""
    cfg = testing.CommConfig(num_experts=8, hidden=32, num_topk=2, max_tokens_per_rank=4,
                             ll_max_tokens_per_rank=4)

    def fn(rank, comm):
        idx = torch.tensor([[0, 9], [3, -1]])  # 9 is no expert
        handle = comm.low_latency_dispatch(torch.randn(2, 32).bfloat16(), idx, torch.rand(2, 2))
        try:
            comm.check()
        except SwiftepIndexError as exc:
            return int(handle.recv_counts.sum()), str(exc)
        return "no error"

    for rank, got in enumerate(run_threads(4, 2, cfg, fn)):
        received = 4 if rank in (0, 1) else 0  # experts 0 and 3 (ranks 0, 1): one row per rank
        assert got[0] == received and "1 topk_idx entries" in got[1], (rank, got)


class _FakeEngine:
    """NvshmemEngine's interface on the CPU, its put_rows doing what the transport kernel does
    (items [dest_offsets[d], dest_offsets[d + 1]) to dest_pes[d], then the signal), so the
    NvshmemTransport's own bookkeeping (grouping by target, offsets, byte views, the rows of
    no destination) runs in CI."""

    def __init__(self, rank, world, buffers, fail_alloc=False):
        self.rank, self.world, self.buffers, self.fail_alloc = rank, world, buffers, fail_alloc
        buffers[rank] = []

    def alloc(self, nbytes):
        if self.fail_alloc:
            from torch_swiftep.nvshmem_engine import NvshmemError
            raise NvshmemError("nvshmem_malloc(...) returned NULL")
        self.buffers[self.rank].append(torch.zeros(nbytes, dtype=torch.uint8))
        return self.buffers[self.rank][-1]

    def _same_on(self, pe, t):  # pe's copy of the symmetric buffer t points into
        for i, flat in enumerate(self.buffers[self.rank]):
            start = t.data_ptr() - flat.data_ptr()
            if 0 <= start < flat.numel():
                return self.buffers[pe][i].view(-1)[start:start + t.numel() * t.element_size()]
        raise AssertionError("not a symmetric buffer")

    def put_rows(self, src, dst, src_rows, dst_rows, dest_offsets, dest_pes, *, channels,
                 signals, status, epoch=0, epoch_ptr=None):
        value = epoch + (int(epoch_ptr) if epoch_ptr is not None else 0)
        for d, pe in enumerate(dest_pes.tolist()):
            there = self._same_on(pe, dst).view(dst.shape)
            for i in range(int(dest_offsets[d]), int(dest_offsets[d + 1])):
                there[int(dst_rows[i])] = src[int(src_rows[i])]
            sig = self._same_on(pe, signals).view(torch.int64)
            sig[self.rank * channels:(self.rank + 1) * channels] = value


def test_nvshmem_transport_groups_rows_by_target_and_drops_no_destination():
    from torch_swiftep.scale_out import NvshmemTransport, Region

    buffers = {}
    region = Region("rows", 8, 4, torch.int32)
    ts_ = [NvshmemTransport(_FakeEngine(r, 3, buffers), None, {"rows": 8 * 16}, ["s"], 1, 1.0,
                            device="cpu") for r in range(3)]
    src = torch.arange(20, dtype=torch.int32).view(5, 4)
    dest = torch.tensor([2, -1, 0, 2, 1])  # unsorted, one row with no destination
    ts_[1].put(region, src, torch.arange(5), torch.tensor([3, 7, 0, 5, 6]), dest, [0, 1, 2],
               "s", torch.tensor([4]))
    got = [t.buffer(region) for t in ts_]
    assert got[2][3].tolist() == src[0].tolist() and got[2][5].tolist() == src[3].tolist()
    assert got[0][0].tolist() == src[2].tolist() and got[1][6].tolist() == src[4].tolist()
    written = sum(int(g.ne(0).any(dim=1).sum()) for g in got)
    assert written == 4 and all(g[7].eq(0).all() for g in got)  # row 1 went nowhere
    for t in ts_:  # rank 1 signalled every target, on both channels, with the device epoch
        assert t._signal_array("s").view(3, -1)[1].tolist() == [4, 4]


def test_nvshmem_transport_says_how_much_heap_it_needs():
    from torch_swiftep.nvshmem_engine import NvshmemError
    from torch_swiftep.scale_out import NvshmemTransport

    with pytest.raises(NvshmemError, match="need 3.0 MiB of the NVSHMEM symmetric heap.*"
                                           "NVSHMEM_SYMMETRIC_SIZE"):
        NvshmemTransport(_FakeEngine(0, 1, {}, fail_alloc=True), None,
                         {"a": 2 << 20, "b": 1 << 20}, ["s"], 1, 1.0, device="cpu")
