"""Per-kernel device times of one dispatch + combine step, ranks as processes (rank r on GPU
r % GPUs), from the torch profiler: which kernel of a call takes the time. The standard prefill
shape; the same CommConfig switches as the multi-process benchmark.

    python3 -m torch_swiftep.bench.kernel_times --world 2 --sms 8 [--fanout] [--partials]
        [--tokens 128,4096] [--groups 1,4]

Prints, per rank, each swiftep kernel's mean device time over the profiled steps. The step's
time also includes the gaps between kernels (launch, waits that start before a peer arrives),
so the sum is not the multi-process benchmark's figure; use it to see the split. --groups G
times the call one chunk of experts makes (PipelinedMoE, split "experts"): every token, but
only its slots whose expert is in the first 1/G of each rank's local experts (the others -1),
so a kernel's cost per call (a pass over all tokens) shows apart from its cost per row. Each
case also prints a digest of the combine's output (the same inputs every run), so two builds
of a kernel can be compared bit for bit.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import sys

from ..launch import rank_gpu
from .multi_process import ENV, _int_list, rank_inputs

STEPS = 5


def _first_group(idx, experts: int, world: int, groups: int):
    """idx with every slot whose expert is outside the first 1/groups of its rank's local
    experts set to -1 (what PipelinedMoE.expert_parts gives chunk 0 of equal groups)."""
    import torch

    local = experts // world
    keep = (idx >= 0) & (idx % local < max(1, local // groups))
    return torch.where(keep, idx, torch.full_like(idx, -1))


def _rank(rank, world, args):
    import torch

    from .. import CommConfig, Communicator

    device = torch.device("cuda", rank_gpu(rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    rows = max(args.tokens) * args.topk
    config = CommConfig(num_experts=args.experts, hidden=args.hidden, num_topk=args.topk,
                        max_tokens_per_rank=max(args.tokens),
                        capacity=max(rows + rows // 4, 1024), num_sms=max(args.sms),
                        dispatch_fanout=args.fanout, combine_partials=args.partials)
    comm = Communicator(torch.distributed.group.WORLD, config, device=device)
    return {(sms, tokens, groups): _times(comm, rank, world, args, device, sms, tokens, groups)
            for sms in args.sms for tokens in args.tokens for groups in args.groups}


def _times(comm, rank, world, args, device, sms: int, tokens: int, groups: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .. import testing

    shape = dict(world=world, hidden=args.hidden, topk=args.topk, experts=args.experts)
    x, idx, w, _ = rank_inputs(shape, tokens, rank, device, seed=tokens)
    idx = _first_group(idx, args.experts, world, groups)
    own = torch.empty(comm.plan.capacity, args.hidden, dtype=torch.bfloat16, device=device)

    def step():
        handle = comm.dispatch(x, idx, w, num_sms=sms)
        own.copy_(testing.expert_output(handle, torch.bfloat16))  # not timed below
        return comm.combine(own, handle, num_sms=sms)

    for _ in range(3):
        y = step()
    torch.cuda.synchronize()
    # the output's bits, so that two builds of a kernel can be compared on the same inputs
    digest = hashlib.sha256(y.cpu().view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    times = collections.defaultdict(float, {f"y sha256 {digest}": 0.0})
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
    p.add_argument("--sms", type=_int_list, default=[8], metavar="LIST",
                   help="SMs per rank (default: 8)")
    p.add_argument("--tokens", type=_int_list, default=[4096], metavar="LIST",
                   help="tokens per rank (default: 4096; the window is sized for the largest)")
    p.add_argument("--groups", type=_int_list, default=[1], metavar="LIST",
                   help="1/G of each rank's experts per call, as one chunk of experts (default 1)")
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
    for rank, runs in enumerate(results):
        for (sms, tokens, groups), times in runs.items():
            print(f"rank {rank}, {sms} SMs, {tokens} tokens, 1/{groups} of the experts, "
                  f"fanout={args.fanout}, partials={args.partials}:")
            for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
                print(f"  {ms:8.3f} ms  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
