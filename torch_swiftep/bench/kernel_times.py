"""Per-kernel device times of one dispatch + combine step, ranks as processes (rank r on GPU
r % GPUs), from the torch profiler: which kernel of a call takes the time. The standard prefill
shape; the same CommConfig switches as the multi-process benchmark.

    python3 -m torch_swiftep.bench.kernel_times --world 2 --sms 8 [--fanout] [--partials]

Prints, per rank, each swiftep kernel's mean device time over the profiled steps. The step's
time also includes the gaps between kernels (launch, waits that start before a peer arrives),
so the sum is not the multi-process benchmark's figure; use it to see the split.
"""
from __future__ import annotations

import argparse
import collections
import sys

from ..launch import rank_gpu
from .multi_process import ENV, rank_inputs

STEPS = 5


def _rank(rank, world, args):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .. import CommConfig, Communicator, testing

    device = torch.device("cuda", rank_gpu(rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    shape = dict(world=world, hidden=args.hidden, topk=args.topk, experts=args.experts)
    rows = args.tokens * args.topk
    config = CommConfig(num_experts=args.experts, hidden=args.hidden, num_topk=args.topk,
                        max_tokens_per_rank=args.tokens, capacity=max(rows + rows // 4, 1024),
                        num_sms=args.sms, dispatch_fanout=args.fanout,
                        combine_partials=args.partials)
    comm = Communicator(torch.distributed.group.WORLD, config, device=device)
    x, idx, w, _ = rank_inputs(shape, args.tokens, rank, device, seed=args.tokens)
    own = torch.empty(config.capacity, args.hidden, dtype=torch.bfloat16, device=device)

    def step():
        handle = comm.dispatch(x, idx, w)
        own.copy_(testing.expert_output(handle, torch.bfloat16))  # not timed below
        return comm.combine(own, handle)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = collections.defaultdict(float)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    for event in prof.events():
        if "swiftep::" in event.name and "_kernel" in event.name:
            times[event.name.split("(")[0]] += event.time_range.elapsed_us() / 1000 / STEPS
    comm.check()
    return dict(times)


def main(argv=None) -> int:
    from ..launch import run_world

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sms", type=int, default=8, help="SMs per rank (default: 8)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--fanout", action="store_true", help="CommConfig(dispatch_fanout=True)")
    p.add_argument("--partials", action="store_true", help="CommConfig(combine_partials=True)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("kernel_times: needs CUDA (it times the kernels on the GPU); none is available",
              file=sys.stderr)
        return 2
    results = run_world(args.world, _rank, args, env=ENV, timeout_s=300)
    for rank, times in enumerate(results):
        print(f"rank {rank}, {args.sms} SMs, fanout={args.fanout}, partials={args.partials}:")
        for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"  {ms:8.3f} ms  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
