"""Failures across ranks on the CUDA backend (ranks as processes sharing one GPU): the
configuration agreed at construction, a peer whose rejected input makes the others give up at
once, and a killed rank named by the survivors, who rebuild over the ranks that remain. Skipped
without a GPU and the compiled extension."""
import os
import re
import signal
import time

import torch
import torch.distributed as dist
from fault_catalogue import GPU_MULTI_RANK_FAULTS as FAULTS
from gpu_world import ENV, GPU_MARKS

import torch_swiftep as ts
from torch_swiftep import testing
from torch_swiftep.launch import rank_gpu, run_world

pytestmark = GPU_MARKS
TIMEOUT_S = 2.0
SLOW_TIMEOUT_S = 20.0  # long enough that giving up "at once" cannot be a timeout
NUM_EXPERTS = 12  # divisible by every world these tests use (2 and 3)


def _setup(rank, hidden=256, timeout_s=TIMEOUT_S):
    device = torch.device("cuda", rank_gpu(rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    cfg = ts.CommConfig(num_experts=NUM_EXPERTS, hidden=hidden, num_topk=2, max_tokens_per_rank=16,
                        timeout_s=timeout_s)
    return device, cfg


def _inputs(device, hidden=256):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, hidden, generator=gen).bfloat16().to(device)
    idx = torch.rand(16, NUM_EXPERTS, generator=gen).topk(2, dim=1).indices.to(device)
    return x, idx, torch.rand(16, 2, generator=gen).to(device)


def _error_of(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _assert_matches(msg: str, fault: str) -> None:
    """msg ("Class: text" from _error_of) is what the catalogue (docs/reliability.md) says."""
    f = FAULTS[fault]
    assert msg.startswith(f"{f.expect.__name__}: ") and re.search(f.pattern, msg), \
        f"{fault}: {msg}"


def _config_mismatch(rank, world):
    device, cfg = _setup(rank, hidden=256 if rank == 0 else 512)
    return _error_of(lambda: ts.Communicator(dist.group.WORLD, cfg, device=device))


def test_config_mismatch_is_named_on_every_rank_before_any_allocation():
    for msg in run_world(2, _config_mismatch, env=ENV, timeout_s=120):
        _assert_matches(msg, "config")


def _peer_rejects(rank, world):
    """Rank 1 rejects its inputs; rank 0's kernels learn it through ctrl.abort and give up at
    once (not after timeout_s). Afterwards both ranks' communicators say they are broken."""
    device, cfg = _setup(rank, timeout_s=SLOW_TIMEOUT_S)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    x, idx, w = _inputs(device)
    if rank == 1:
        rejected = _error_of(lambda: comm.dispatch(x[:, :128].contiguous(), idx, w))
        after = _error_of(lambda: comm.dispatch(x, idx, w))
        time.sleep(5)  # alive while rank 0 gives up and reads the posted reason
        return rejected, after, 0.0
    t0 = time.monotonic()
    comm.dispatch(x, idx, w)
    waited = _error_of(comm.check)
    seconds = time.monotonic() - t0
    return waited, _error_of(lambda: comm.dispatch(x, idx, w)), seconds


def test_a_peers_rejected_input_fails_the_others_fast_naming_it():
    (waited, later, seconds), (rejected, after, _) = run_world(2, _peer_rejects, env=ENV,
                                                               timeout_s=120)
    _assert_matches(rejected, "rejected")
    _assert_matches(waited, "peer_waited")
    assert seconds < SLOW_TIMEOUT_S / 2, f"gave up after {seconds:.1f} s, not at once"
    print(f"the waiting rank raised {seconds:.2f} s after its dispatch (timeout_s="
          f"{SLOW_TIMEOUT_S:g})")
    for msg in (later, after):
        _assert_matches(msg, "later")


def _killed(rank, world):
    """World 3: rank 2 dies between calls; the survivors name it within the bound, then rebuild
    a communicator over ranks 0 and 1 in the same process and run a checked step on it."""
    device, cfg = _setup(rank)
    comm = ts.Communicator(dist.group.WORLD, cfg, device=device)
    x, idx, w = _inputs(device)
    comm.combine(comm.combine_buffer().zero_(), comm.dispatch(x, idx, w))
    comm.check()
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1)
    t0 = time.monotonic()
    comm.dispatch(x, idx, w)
    failed, seconds = _error_of(comm.check), time.monotonic() - t0
    group = dist.new_group([0, 1], use_local_synchronization=True)
    case = testing.Case(11, torch.bfloat16, 256, 2, "holes", 8, (13, 7))
    small = ts.Communicator(group, case.config(timeout_s=30), device=device)
    return failed, seconds, testing.run_step(small, rank, testing.expected(case), zero_copy=False,
                                                    device=device)


def test_a_killed_rank_is_named_and_the_survivors_rebuild():
    results = run_world(3, _killed, env=ENV, timeout_s=180, may_die=(2,))
    assert results[2] is None
    for msg, seconds, errors in results[:2]:
        _assert_matches(msg, "killed")
        assert seconds < TIMEOUT_S + 5, seconds
        print(f"a survivor raised {seconds:.2f} s after its dispatch (timeout_s={TIMEOUT_S:g})")
        assert not errors, errors[:5]
