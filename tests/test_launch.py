"""torch_swiftep.launch.run_world: what every multi-process test and benchmark stands on."""
import os
import time

import pytest
import torch

from torch_swiftep.launch import WorldError, run_world


def _threads(rank, world):
    return torch.get_num_threads()


def test_ranks_share_the_cores(monkeypatch):
    """Each rank takes cores / world torch threads (8 ranks with the default thread count each
    were measured to spend minutes in a sub-second CPU reference); OMP_NUM_THREADS wins."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert run_world(2, _threads, timeout_s=120) == [max(1, (os.cpu_count() or 1) // 2)] * 2
    assert run_world(2, _threads, env={"OMP_NUM_THREADS": "1"}, timeout_s=120) == [1, 1]


def _sleep(rank, world, seconds):
    time.sleep(seconds)
    return rank


def test_stacks_after_prints_every_ranks_stack(capfd):
    assert run_world(2, _sleep, 3.0, env={"SWIFTEP_STACKS_AFTER_S": "1"},
                     timeout_s=120) == [0, 1]
    err = capfd.readouterr().err
    assert err.count("Timeout (0:00:01)!") == 2, err[-2000:]
    assert "in _sleep" in err, err[-2000:]


def _raise(rank, world):
    if rank == 1:
        raise ValueError("rank 1 refuses")
    time.sleep(30)


def test_a_raising_rank_fails_the_world_naming_it():
    start = time.monotonic()
    with pytest.raises(WorldError, match=r"rank 1 raised:(.|\n)*ValueError: rank 1 refuses"):
        run_world(2, _raise, timeout_s=120)
    assert time.monotonic() - start < 25  # the other rank is not waited for
