"""Run a function on every rank of a fresh process group, with bounded waits.

    results = run_world(4, my_fn, arg1, arg2, backend="gloo", timeout_s=120)

`my_fn(rank, world_size, *args)` must be importable (a module-level function). Each rank runs in
its own process (start method spawn); the return values come back in rank order. A rank that
raises, dies or outlives timeout_s makes run_world raise WorldError naming it, after the other
ranks are killed: a broken rank fails the caller instead of hanging it.

NO_MULTICAST_ENV is the environment that keeps NVLink multicast off; the shell scripts take it
from `eval "$(python3 -m torch_swiftep.launch --print-env)"`.
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import queue
import shlex
import socket
import sys
import time
import traceback

import torch.multiprocessing as mp

# NVLink multicast stays off (NCCL, torch symmetric memory, NVSHMEM): on shared hosts a program
# using it can take the host's GPUs down. Nothing in torch_swiftep uses multicast.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}


class WorldError(RuntimeError):
    pass


def rank_gpu(rank: int, gpus: int) -> int:
    """The GPU of a rank in a world of processes on a host with `gpus` GPUs: rank % gpus (one
    each when there are enough; on a one-GPU machine every rank shares it, under MPS)."""
    return rank % max(gpus, 1)


def ranks_per_gpu(world: int, gpus: int) -> int:
    """Ranks on the busiest GPU under rank_gpu: they share its SMs."""
    return -(-world // max(gpus, 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, group_timeout_s, env, fn, args, results):
    import torch.distributed as dist

    os.environ.update(env)
    # SWIFTEP_STACKS_AFTER_S=N: every rank prints its Python stacks after N s (once), to see
    # where a world that outlives its timeout waits.
    stacks_after = float(os.environ.get("SWIFTEP_STACKS_AFTER_S", "0") or 0)
    if stacks_after > 0:
        faulthandler.dump_traceback_later(stacks_after, exit=False)
    try:
        import torch

        # The ranks share the host's cores: each takes its share for torch's CPU threads (as
        # torchrun does), unless OMP_NUM_THREADS says otherwise (set here explicitly: torch read
        # the environment when this process imported it, before `env` was applied). Measured:
        # 8 ranks on 16 cores, each with torch's default of 16 threads, spent over 70 s building
        # a reference that takes under a second alone (the thread pools spin against each other).
        threads = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                              else max(1, (os.cpu_count() or 1) // world_size))
        if backend == "nccl":
            torch.cuda.set_device(rank_gpu(rank, torch.cuda.device_count()))
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=group_timeout_s))
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:  # report everything, including SystemExit from a test helper
        results.put((rank, False, traceback.format_exc()))
    finally:
        # The result is on its way before anything else can go wrong: a library that crashes
        # while the process exits (seen: NVSHMEM left initialized after an error) would
        # otherwise take the queue's unflushed result with it.
        results.close()
        results.join_thread()
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_world(world_size: int, fn, *args, backend: str = "gloo", timeout_s: float = 180.0,
              env: dict | None = None, group_timeout_s: float | None = None,
              may_die: tuple = ()) -> list:
    """Run fn(rank, world_size, *args) on world_size spawned ranks; return their results.
    may_die: ranks a test kills on purpose; their result is None instead of a failure."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    group_timeout_s = group_timeout_s or timeout_s
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, group_timeout_s,
                                          dict(env or {}), fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    got: dict[int, tuple[bool, object]] = {}
    failure = None
    while len(got) < world_size and failure is None:
        for r in may_die:  # killed on purpose: no result will come
            if r not in got and procs[r].exitcode is not None:
                got[r] = (True, None)
        if len(got) == world_size:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(got))
            failure = f"ranks {missing} did not finish within timeout_s={timeout_s}"
            break
        try:
            rank, ok, value = results.get(timeout=min(remaining, 1.0))
            got[rank] = (ok, value)
            if not ok:
                failure = f"rank {rank} raised:\n{value}"
        except queue.Empty:
            dead = [r for r, p in enumerate(procs)
                    if r not in got and r not in may_die and p.exitcode is not None]
            if dead:
                time.sleep(0.5)  # its result may still be in flight
                try:
                    while True:
                        rank, ok, value = results.get_nowait()
                        got[rank] = (ok, value)
                except queue.Empty:
                    pass
                dead = [r for r in dead if r not in got]
                if dead:
                    failure = (f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                               "before reporting")
    for p in procs:
        p.join(timeout=5 if failure is None else 0.1)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    if failure is not None:
        raise WorldError(failure)
    return [got[r][1] for r in range(world_size)]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python3 -m torch_swiftep.launch",
                                     description="Environment for the GPU scripts.")
    parser.add_argument("--print-env", action="store_true", required=True,
                        help="print `export` lines for NO_MULTICAST_ENV (NVLink multicast off), "
                             'for eval "$(...)" in a shell script')
    parser.parse_args(argv)
    print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in NO_MULTICAST_ENV.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
