"""Every bad input raises a clear Python error that names the argument and the value.

The faults themselves are data in fault_catalogue.py, which docs/reliability.md is rendered from.
"""
import pytest
import torch
from fault_catalogue import DOC, inputs, render, single_rank_faults
from fault_catalogue import comm as make_comm

import torch_swiftep as ts

FAULTS = single_rank_faults()


@pytest.fixture
def comm():
    return make_comm()


def test_good_inputs_pass(comm):
    x, idx, w = inputs()
    comm.dispatch(x, idx, w)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.what for f in FAULTS])
def test_fault_raises_its_error(fault):
    with pytest.raises(fault.expect, match=fault.pattern):
        fault.run()


def test_catalogue_is_large_and_the_doc_current():
    assert len(FAULTS) >= 50
    assert DOC.read_text() == render(), (
        "docs/reliability.md is stale: python3 tests/fault_catalogue.py --write")


def test_swiftep_index_error_is_both():
    assert issubclass(ts.SwiftepIndexError, ts.SwiftepError)
    assert issubclass(ts.SwiftepIndexError, IndexError)


def test_start_runs_and_waits_on_cpu(comm):
    x, idx, w = inputs()
    pending = comm.start(comm.dispatch, x, idx, w)
    handle = pending.wait()
    assert torch.equal(handle.token_rows, comm.dispatch(x, idx, w).token_rows)


def test_dispatch_layout_method(comm):
    _, idx, _ = inputs()
    per_rank, per_expert, in_rank = comm.dispatch_layout(idx)
    assert per_rank.tolist() == [idx.size(0)] and int(per_expert.sum()) == idx.numel()
    assert in_rank.shape == (idx.size(0), 1)


def test_combine_accepts_the_latest_handle(comm):
    x, idx, w = inputs()
    comm.dispatch(x, idx, w)
    comm.combine(comm.combine_buffer(), comm.dispatch(x, idx, w))
