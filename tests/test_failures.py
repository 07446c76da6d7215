"""Failures that involve more than one rank, on the CPU backend (gloo): every rank gets a clear
SwiftepError naming the rank and the call, within timeout_s, and nothing hangs."""
import os
import re
import signal
import time

import pytest
import torch
import torch.distributed as dist
from fault_catalogue import MULTI_RANK_FAULTS as FAULTS
from fault_catalogue import caught as _caught

import torch_swiftep as ts
from torch_swiftep import testing
from torch_swiftep.launch import run_world

pytestmark = pytest.mark.slow
E, H, K, T = 8, 32, 2, 16


def _config(timeout_s=20.0, **overrides):
    fields = dict(num_experts=E, hidden=H, num_topk=K, max_tokens_per_rank=T, timeout_s=timeout_s,
                  dtype=torch.float32)
    return ts.CommConfig(**{**fields, **overrides})


def _inputs(rank, world, seed=3, experts=E):
    inp = testing.world_inputs(seed, [6] * world, H, experts, K, torch.float32, "uniform")
    return inp.xs[rank], inp.topk_idx[rank], inp.topk_weights[rank]


def _matches(observed, fault) -> bool:
    """observed: (class name, message, seconds) from _caught; fault: its catalogue entry."""
    return observed[0] == fault.expect.__name__ and re.search(fault.pattern, observed[1])


def _config_mismatch(rank, world):
    return _caught(lambda: ts.Communicator(dist.group.WORLD, _config(hidden=32 + 32 * rank)))


def test_ranks_that_disagree_on_the_config_all_get_the_field_and_values():
    for observed in run_world(2, _config_mismatch, timeout_s=60):
        assert _matches(observed, FAULTS[0]), observed


def _one_bad_input(rank, world):
    comm = ts.Communicator(dist.group.WORLD, _config())
    x, idx, w = _inputs(rank, world)
    if rank == 1:
        idx[2, 1] = E + 5
    first = _caught(lambda: comm.dispatch(x, idx, w))
    x, idx, w = _inputs(rank, world)  # then good inputs: the communicator is usable again
    handle = comm.dispatch(x, idx, w)
    comm.combine(comm.combine_buffer(torch.float32).zero_(), handle)
    return first


def test_one_rank_rejecting_its_input_fails_every_rank_at_once():
    good, bad = run_world(2, _one_bad_input, timeout_s=60)
    assert _matches(bad, FAULTS[1]), bad
    assert _matches(good, FAULTS[2]), good
    assert good[2] < 10, f"rank 0 waited {good[2]:.1f} s: it should learn at once, not at " \
                         "timeout_s=20"


def _never_calls(rank, world):
    comm = ts.Communicator(dist.group.WORLD, _config(timeout_s=1.5))
    x, idx, w = _inputs(rank, world)
    if rank == 1:
        time.sleep(3)  # alive, but late for the call
    first = _caught(lambda: comm.dispatch(x, idx, w))
    later = _caught(lambda: comm.dispatch(x, idx, w))
    dist.barrier()  # rank 0 hosts the store: it stays until rank 1 has seen the verdict
    return first, later


def test_a_rank_that_never_calls_is_named_within_the_timeout():
    (first0, later0), (first1, _) = run_world(2, _never_calls, timeout_s=60)
    assert _matches(first0, FAULTS[3]), first0
    assert 1.5 <= first0[2] < 4, first0[2]
    # the late rank does not hang in the collective alone: it learns the call was given up
    assert _matches(first1, FAULTS[4]), first1
    assert _matches(later0, FAULTS[5]), later0


def _late_across_nodes(rank, world):
    comm = ts.Communicator(dist.group.WORLD, _config(timeout_s=1.5, ranks_per_node=2))
    x, idx, w = _inputs(rank, world)
    if rank == 3:
        time.sleep(3)  # alive, but late for the call
    observed = _caught(lambda: comm.dispatch(x, idx, w))
    dist.barrier()  # rank 0 hosts the store: it stays until rank 3 has seen the verdict
    return observed


def test_a_rank_late_across_a_node_boundary_is_named_with_its_node():
    results = run_world(4, _late_across_nodes, timeout_s=60)
    for observed in results[:3]:  # rank 2 shares rank 3's node; ranks 0 and 1 do not
        assert _matches(observed, FAULTS[7]), observed
        assert 1.5 <= observed[2] < 4, observed[2]


def _dead_rank(rank, world):
    comm = ts.Communicator(dist.group.WORLD, _config(timeout_s=2.0, num_experts=12))
    x, idx, w = _inputs(rank, world, experts=12)
    comm.combine(comm.combine_buffer(torch.float32).zero_(), comm.dispatch(x, idx, w))
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    failed = _caught(lambda: comm.dispatch(x, idx, w))
    # the survivors rebuild over the ranks that remain, in the same process
    group = dist.new_group([0, 1], use_local_synchronization=True)
    small = ts.Communicator(group, _config(timeout_s=2.0, num_experts=12))
    x, idx, w = _inputs(rank, 2, seed=4, experts=12)
    y = small.combine(small.combine_buffer(torch.float32).zero_(), small.dispatch(x, idx, w))
    return failed, tuple(y.shape)


def test_a_killed_rank_is_named_and_the_survivors_rebuild():
    results = run_world(3, _dead_rank, timeout_s=90, may_die=(2,))
    assert results[2] is None
    for observed, shape in results[:2]:
        assert _matches(observed, FAULTS[6]), observed
        assert observed[2] < 6, observed[2]
        assert shape == (6, H)


def test_a_device_timeout_adds_what_the_awaited_rank_posted():
    """CUDA: a kernel that timed out waiting for rank 1 reports it through the status word;
    the host adds why rank 1 never came, if it posted a rejection (agreement.post_rejection)."""
    from torch_swiftep.ops.protocol import STATUS
    from torch_swiftep.status import raise_if_error

    status = torch.tensor([STATUS["timeout"], 1, 0, 7])
    posted = "rank 1 rejected its inputs for dispatch call 3 (SwiftepIndexError: ...)"
    with pytest.raises(ts.SwiftepError, match=r"timed out waiting for rank 1 .*call 7.*; "
                                              r"rank 1 rejected its inputs for dispatch call 3"):
        raise_if_error(status, 0, about_rank=lambda peer: posted if peer == 1 else None)


def test_a_device_timeout_across_nodes_names_the_node():
    """CUDA: the status word names a rank; with several nodes the message adds its node, and
    with one node it stays as before."""
    from torch_swiftep.ops.protocol import STATUS
    from torch_swiftep.status import raise_if_error

    for per_node, named in ((2, r"rank 3 \(node 1\) \(dispatch"), (4, r"rank 3 \(dispatch")):
        status = torch.tensor([STATUS["timeout"], 3, 0, 7])
        with pytest.raises(ts.SwiftepError, match=r"timed out waiting for " + named):
            raise_if_error(status, 0, ranks_per_node=per_node, world=4)


def _post_and_read(rank, world):
    from torch_swiftep.agreement import Agreement

    agreement = Agreement(dist.group.WORLD, timeout_s=10)
    if rank == 1:
        agreement.post_rejection("dispatch", 3, ValueError("x has hidden=32"))
    dist.barrier()
    return agreement.rejection_of(1), agreement.rejection_of(0)


def test_a_rejection_posted_by_one_rank_is_read_by_another():
    (posted, nothing), _ = run_world(2, _post_and_read, timeout_s=60)
    assert posted == "rank 1 rejected its inputs for dispatch call 3 (ValueError: x has hidden=32)"
    assert nothing is None
