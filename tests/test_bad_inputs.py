"""Every bad input raises a clear Python error that names the argument and the value."""
import pytest
import torch

import torch_swiftep as ts

E, H, K, T = 8, 64, 2, 16


@pytest.fixture
def comm():
    return ts.Communicator(None, ts.CommConfig(num_experts=E, hidden=H, num_topk=K,
                                               max_tokens_per_rank=T, ll_max_tokens_per_rank=T))


def inputs(n=6, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, H, generator=gen).to(dtype)
    idx = torch.rand(n, E, generator=gen).topk(K, dim=1).indices
    w = torch.rand(n, K, generator=gen)
    return x, idx, w


def test_good_inputs_pass(comm):
    x, idx, w = inputs()
    comm.dispatch(x, idx, w)


@pytest.mark.parametrize("method", ["dispatch", "low_latency_dispatch"])
@pytest.mark.parametrize("mutate, exc, pattern", [
    (lambda x, i, w: (x.to(torch.int32), i, w), TypeError, r"x must have dtype in .*torch.int32"),
    (lambda x, i, w: (x[:, :32].contiguous(), i, w), ValueError, r"x has hidden=32"),
    (lambda x, i, w: (x.unsqueeze(0), i, w), ValueError, r"x must have 2 dimensions"),
    (lambda x, i, w: (x.t().contiguous().t(), i, w), ValueError, r"x must be contiguous"),
    (lambda x, i, w: (x.to("meta"), i, w), ValueError, r"x is on meta"),
    (lambda x, i, w: (x, i.float(), w), TypeError, r"topk_idx must have dtype"),
    (lambda x, i, w: (x, i[:5], w[:5]), ValueError, r"topk_idx has 5 tokens but x has 6"),
    (lambda x, i, w: (x, i, w[:, :1].contiguous()), ValueError, r"topk_weights.shape=\(6, 1\)"),
    (lambda x, i, w: (x, i, w.double()), TypeError, r"topk_weights must have dtype"),
    (lambda x, i, w: (x, i.t().contiguous().t(), w), ValueError, r"topk_idx must be contiguous"),
    (lambda x, i, w: (x, torch.full((6, 3), 1), torch.ones(6, 3)), ValueError,
     r"num_topk=3, more than the communicator's num_topk=2"),
    (lambda x, i, w: (x, i.index_fill(1, torch.tensor([0]), E), w), IndexError,
     r"topk_idx\[0, 0\] = 8 is out of range"),
    (lambda x, i, w: (x, i.index_fill(1, torch.tensor([1]), -2), w), IndexError,
     r"topk_idx\[0, 1\] = -2 is out of range"),
    (lambda x, i, w: (torch.randn(T + 1, H).bfloat16(), torch.zeros(T + 1, K, dtype=torch.long),
                      torch.ones(T + 1, K)), ValueError, r"x has 17 tokens, more than"),
])
def test_bad_dispatch_input(comm, method, mutate, exc, pattern):
    x, idx, w = mutate(*inputs())
    with pytest.raises(exc, match=pattern):
        getattr(comm, method)(x, idx, w)


def test_fp8_needs_scales(comm):
    x, idx, w = inputs()
    with pytest.raises(ValueError, match="x_scales .* is required"):
        comm.dispatch(x.to(torch.float8_e4m3fn), idx, w)
    with pytest.raises(ValueError, match=r"x_scales is given but x has dtype torch.bfloat16"):
        comm.dispatch(x, idx, w, x_scales=torch.ones(6, 1))


def test_fp8_scales_shape():
    _, idx, w = inputs()
    cfg = ts.CommConfig(num_experts=E, hidden=128, num_topk=K, max_tokens_per_rank=T)
    c = ts.Communicator(None, cfg)
    q, s = ts.quantize_fp8(torch.randn(6, 128))
    with pytest.raises(ValueError, match=r"x_scales.shape=\(6, 2\) must be \(6, 1\)"):
        c.dispatch(q, idx, w, x_scales=torch.ones(6, 2))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(num_experts=6, hidden=H, num_topk=K, max_tokens_per_rank=T), None),  # checked below
    (dict(num_experts=4, hidden=H, num_topk=5, max_tokens_per_rank=T),
     r"num_topk=5 is larger than num_experts=4"),
    (dict(num_experts=E, hidden=H, num_topk=K, max_tokens_per_rank=0),
     r"max_tokens_per_rank must be a positive int, got 0"),
    (dict(num_experts=E, hidden=3, num_topk=K, max_tokens_per_rank=T),
     r"hidden=3 gives rows of 6 bytes"),
    (dict(num_experts=E, hidden=H, num_topk=K, max_tokens_per_rank=T, dtype=torch.int8),
     r"dtype must be one of"),
    (dict(num_experts=E, hidden=H, num_topk=K, max_tokens_per_rank=T, timeout_s=0),
     r"timeout_s must be > 0, got 0"),
])
def test_bad_config(kwargs, pattern):
    if pattern is None:
        config = ts.CommConfig(**kwargs)
        with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by world_size=4"):
            ts.Plan.build(config, rank=0, world_size=4)
        return
    with pytest.raises(ValueError, match=pattern):
        ts.CommConfig(**kwargs)


def test_capacity_overflow_raises(comm):
    small = ts.Communicator(None, ts.CommConfig(num_experts=E, hidden=H, num_topk=K,
                                                max_tokens_per_rank=T, capacity=5))
    x, idx, w = inputs()
    with pytest.raises(ts.SwiftepError, match=r"capacity overflow: rank 0 receives 12 rows, "
                                              r"more than capacity=5"):
        small.dispatch(x, idx, w)


def test_combine_checks(comm):
    x, idx, w = inputs()
    handle = comm.dispatch(x, idx, w)
    out = comm.combine_buffer()
    with pytest.raises(ValueError, match=r"expert_out has hidden=32"):
        comm.combine(out[:, :32].contiguous(), handle)
    with pytest.raises(ValueError, match=r"expert_out has 3 rows"):
        comm.combine(out[:3], handle)
    with pytest.raises(ValueError, match=r"token_rows.shape=\(5, 2\) must equal"):
        comm.combine(out, handle._replace(token_rows=handle.token_rows[:5]))
    with pytest.raises(TypeError, match=r"topk_weights must have dtype"):
        comm.combine(out, handle, topk_weights=w.double())


def test_low_latency_needs_windows():
    c = ts.Communicator(None, ts.CommConfig(num_experts=E, hidden=H, num_topk=K,
                                            max_tokens_per_rank=T))
    x, idx, w = inputs()
    with pytest.raises(ValueError, match=r"no low-latency windows"):
        c.low_latency_dispatch(x, idx, w)


def test_num_sms_checked(comm):
    x, idx, w = inputs()
    with pytest.raises(ValueError, match=r"num_sms must be a positive int, got 0"):
        comm.dispatch(x, idx, w, num_sms=0)


def test_op_called_directly_checks_values():
    """The op itself validates, not only the wrapper."""
    c = ts.Communicator(None, ts.CommConfig(num_experts=E, hidden=H, num_topk=K,
                                            max_tokens_per_rank=T))
    x, idx, w = inputs()
    idx[2, 1] = 99
    with pytest.raises(IndexError, match=r"topk_idx\[2, 1\] = 99"):
        torch.ops.swiftep.dispatch(x, None, idx, w, c.workspace, c.peer_ptrs, "",
                                   c.plan.as_list(), 4)


def test_start_runs_and_waits_on_cpu(comm):
    x, idx, w = inputs()
    pending = comm.start(comm.dispatch, x, idx, w)
    handle = pending.wait()
    assert torch.equal(handle.token_rows, comm.dispatch(x, idx, w).token_rows)


def test_start_takes_only_this_communicators_methods(comm):
    other = ts.Communicator(None, comm.config)
    x, idx, w = inputs()
    with pytest.raises(ValueError, match="start\\(\\) takes a method of this Communicator"):
        comm.start(other.dispatch, x, idx, w)


def test_out_of_range_index_is_a_swiftep_index_error(comm):
    """The class a GPU kernel reports for the same input (status word -> SwiftepIndexError)."""
    x, idx, w = inputs()
    idx[4, 0] = E
    with pytest.raises(ts.SwiftepIndexError, match=r"topk_idx\[4, 0\] = 8 is out of range"):
        comm.dispatch(x, idx, w)
    assert issubclass(ts.SwiftepIndexError, ts.SwiftepError)
    assert issubclass(ts.SwiftepIndexError, IndexError)


def test_dispatch_layout_method_checks_once(comm):
    _, idx, _ = inputs()
    per_rank, per_expert, in_rank = comm.dispatch_layout(idx)
    assert per_rank.tolist() == [idx.size(0)] and int(per_expert.sum()) == idx.numel()
    assert in_rank.shape == (idx.size(0), 1)
    with pytest.raises(ValueError, match=r"topk_idx must have 2 dimensions, got shape \(12,\)"):
        comm.dispatch_layout(idx.flatten())
    with pytest.raises(TypeError, match=r"topk_idx must have dtype in"):
        comm.dispatch_layout(idx.float())


def test_combine_refuses_a_foreign_or_stale_handle(comm):
    x, idx, w = inputs()
    other = ts.Communicator(None, comm.config)
    foreign = other.dispatch(x, idx, w)
    with pytest.raises(ValueError, match=r"the handle comes from another Communicator"):
        comm.combine(comm.combine_buffer(), foreign)
    old = comm.dispatch(x, idx, w)
    new = comm.dispatch(x, idx, w)
    with pytest.raises(ValueError, match=r"stale handle: it comes from call \d+ \(dispatch\), "
                                         r"but the dispatch of call \d+ has since overwritten"):
        comm.combine(comm.combine_buffer(), old)
    comm.combine(comm.combine_buffer(), new)
    ll_old = comm.low_latency_dispatch(x, idx, w)
    comm.low_latency_dispatch(x, idx, w)
    with pytest.raises(ValueError, match=r"stale handle.*low_latency_dispatch"):
        comm.low_latency_combine(comm.low_latency_combine_buffer(), ll_old)
