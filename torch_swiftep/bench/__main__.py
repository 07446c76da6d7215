"""python -m torch_swiftep.bench: the main job.

On a GPU with the CUDA extension: the one-process emulated world (throughput and low-latency
schedules, plain-torch comparison, SM and token sweeps, plot). On a CPU-only machine: an
emulated world of gloo processes running the CPU backend, checked against the reference.
"""
from __future__ import annotations

import argparse
import os
import sys

# Several ranks share this process and spin on each other's flags: lazy kernel loading would
# synchronize the context in the middle of that and stall them (see Communicator.emulated_world).
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

import torch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_swiftep.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=None,
                        help="ranks to emulate (default: 8 on a GPU, 4 on CPU)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per rank (default: 4096 on a GPU, 256 on CPU)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--cpu", action="store_true", help="use the CPU backend even on a GPU")
    parser.add_argument("--out", default=None, help="folder for JSON results and PNG plots")
    parser.add_argument("--quick", action="store_true",
                        help="GPU: fewer sweep points (a smoke run)")
    parser.add_argument("--no-check", action="store_true", help="GPU: skip the reference check")
    parser.add_argument("--low-latency-only", action="store_true")
    parser.add_argument("--throughput-only", action="store_true")
    parser.add_argument("--trace", action="store_true",
                        help="GPU: also print the low-latency kernels' phase trace")
    args = parser.parse_args(argv)

    import torch_swiftep

    use_gpu = (not args.cpu and torch.cuda.is_available()
               and torch_swiftep.CUDA_EXTENSION_ERROR is None)
    if not use_gpu:
        if torch.cuda.is_available() and not args.cpu:
            print(f"CUDA extension unavailable ({torch_swiftep.CUDA_EXTENSION_ERROR}): "
                  "running the CPU backend")
        from . import cpu_world

        ok = cpu_world.run(world=args.world or 4, tokens=args.tokens or 256, hidden=args.hidden,
                           topk=args.topk, experts=args.experts)
        return 0 if ok else 1

    from . import gpu_world, low_latency

    ok = True
    world, tokens = args.world or 8, args.tokens or 4096
    if not args.low_latency_only:
        sweep = dict(sms_per_rank=(4,), token_sweep=(tokens,)) if args.quick else {}
        ok &= gpu_world.run(world=world, tokens=tokens, hidden=args.hidden, topk=args.topk,
                            experts=args.experts, out_dir=args.out, check=not args.no_check,
                            **sweep)
    if not args.throughput_only:
        ok &= low_latency.run(world=world, hidden=args.hidden, topk=args.topk,
                              experts=args.experts, out_dir=args.out,
                              check=not args.no_check, trace=args.trace)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
