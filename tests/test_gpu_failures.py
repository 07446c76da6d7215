"""Failures across ranks on the CUDA backend (ranks as processes sharing one GPU): the
configuration agreed at construction, a peer's rejected input named in the timeout it causes,
and a killed rank named by the survivors. Skipped without a GPU and the compiled extension."""
import os
import signal
import time

import torch
import torch.distributed as dist
from gpu_world import ENV, GPU_MARKS

import torch_swiftep as ts
from torch_swiftep.launch import run_world

pytestmark = GPU_MARKS
TIMEOUT_S = 2.0


def _setup(rank, hidden=256):
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    cfg = ts.CommConfig(num_experts=8, hidden=hidden, num_topk=2, max_tokens_per_rank=16,
                        timeout_s=TIMEOUT_S)
    return device, cfg


def _inputs(device, hidden=256):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, hidden, generator=gen).bfloat16().to(device)
    idx = torch.rand(16, 8, generator=gen).topk(2, dim=1).indices.to(device)
    return x, idx, torch.rand(16, 2, generator=gen).to(device)


def _error_of(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _config_mismatch(rank, world):
    device, cfg = _setup(rank, hidden=256 if rank == 0 else 512)
    return _error_of(lambda: ts.Communicator(dist.group.WORLD, cfg, device=device))


def test_config_mismatch_is_named_on_every_rank_before_any_allocation():
    for msg in run_world(2, _config_mismatch, env=ENV, timeout_s=120):
        assert msg.startswith("ValueError") and "hidden differs (rank 0: 256; rank 1: 512)" in msg


def _peer_rejects(rank, world):
    device, cfg = _setup(rank)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    x, idx, w = _inputs(device)
    if rank == 1:
        rejected = _error_of(lambda: comm.dispatch(x[:, :128].contiguous(), idx, w))
        time.sleep(TIMEOUT_S + 8)  # alive while rank 0's kernel waits and it reads the store
        return rejected
    comm.dispatch(x, idx, w)
    return _error_of(comm.check)


def test_a_peers_rejected_input_is_named_in_the_timeout_it_causes():
    waited, rejected = run_world(2, _peer_rejects, env=ENV, timeout_s=120)
    assert rejected.startswith("ValueError") and "x has hidden=128" in rejected
    assert "timed out waiting for rank 1" in waited, waited
    assert "rank 1 rejected its inputs for dispatch call 1 (ValueError: x has hidden=128" \
        in waited, waited


def _killed(rank, world):
    device, cfg = _setup(rank)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    x, idx, w = _inputs(device)
    comm.combine(comm.combine_buffer().zero_(), comm.dispatch(x, idx, w))
    comm.check()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1)
    t0 = time.monotonic()
    comm.dispatch(x, idx, w)
    return _error_of(comm.check), time.monotonic() - t0


def test_a_killed_rank_is_named_by_the_survivor_within_the_bound():
    results = run_world(2, _killed, env=ENV, timeout_s=120, may_die=(1,))
    msg, seconds = results[0]
    assert "timed out waiting for rank 1" in msg, msg
    assert seconds < TIMEOUT_S + 5, seconds
