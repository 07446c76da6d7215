"""torch.library.opcheck over every op registered under torch.ops.swiftep.

The list comes from torch's registry, not from ops/, so an op that is registered without
sample inputs here fails the test instead of being skipped silently.
"""
import pytest
import torch

import torch_swiftep as ts
from torch_swiftep import testing

E, H, K, T = 8, 48, 3, 12


def _samples():
    comm = ts.Communicator(None, ts.CommConfig(num_experts=E, hidden=H, num_topk=K,
                                               max_tokens_per_rank=T, ll_max_tokens_per_rank=T))
    inp = testing.world_inputs(7, [9], H, E, K, torch.bfloat16, "holes")
    x, idx, w = inp.xs[0], inp.topk_idx[0], inp.topk_weights[0]
    state = (comm.workspace, comm.peer_ptrs, comm.group_name, comm.plan.as_list(), 4)
    handle = comm.dispatch(x, idx, w)
    ll = comm.low_latency_dispatch(x, idx, w)
    out = torch.randn(comm.plan.capacity, H).bfloat16()
    ll_out = torch.randn(E, T, H).bfloat16()
    return {
        "dispatch_layout": [(idx, E, 1), (idx.int(), E, 1)],
        "dispatch": [(x, None, idx, w, *state), (x, None, idx.int(), w, *state)],
        "combine": [(out, idx, w, handle.token_rows, handle.expert_offsets, *state)],
        "combine_symmetric": [(out, torch.zeros(1, 1, dtype=torch.int64), seg, 0, idx, w,
                               handle.token_rows, handle.expert_offsets, *state)
                              for seg in (0, -1)],  # in place, and staged
        "low_latency_dispatch": [(x, None, idx, w, *state)],
        "low_latency_combine": [(ll_out, idx, w, ll.token_rows, ll.recv_counts, *state)],
        "swiglu_rows": [(torch.randn(10, 2 * H).bfloat16(), torch.tensor([4, 7]).int()),
                        (torch.randn(10, 2 * H), torch.tensor([12]).int())],
    }


def test_every_registered_op_has_samples():
    assert set(ts.registered_ops()) == set(_samples())


@pytest.mark.parametrize("name", ts.registered_ops())
def test_opcheck(name):
    samples = _samples()
    assert name in samples, f"swiftep::{name} is registered but has no opcheck samples"
    op = getattr(torch.ops.swiftep, name).default
    for args in samples[name]:
        torch.library.opcheck(op, args)


def test_fp8_dispatch_opcheck():
    # SchemaCheckMode (opcheck's test_schema) compares tensors with arithmetic that float8 has no
    # CPU kernel for, so the FP8 sample runs the other checks; the bf16 samples above cover
    # test_schema for the same op.
    comm = ts.Communicator(None, ts.CommConfig(num_experts=E, hidden=128, num_topk=K,
                                               max_tokens_per_rank=T))
    inp = testing.world_inputs(3, [5], 128, E, K, torch.bfloat16, "uniform", fp8=True)
    torch.library.opcheck(torch.ops.swiftep.dispatch.default, (
        inp.xs[0], inp.x_scales[0], inp.topk_idx[0], inp.topk_weights[0], comm.workspace,
        comm.peer_ptrs, "", comm.plan.as_list(), 4),
        test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("name", ["dispatch", "low_latency_dispatch"])
def test_quantizing_dispatch_opcheck(name):
    comm = ts.Communicator(None, ts.CommConfig(num_experts=E, hidden=256, num_topk=K,
                                               max_tokens_per_rank=T, ll_max_tokens_per_rank=T))
    inp = testing.world_inputs(5, [7], 256, E, K, torch.bfloat16, "holes")
    torch.library.opcheck(getattr(torch.ops.swiftep, name).default, (
        inp.xs[0], None, inp.topk_idx[0], inp.topk_weights[0], comm.workspace, comm.peer_ptrs,
        "", comm.plan.as_list(), 4, True))
