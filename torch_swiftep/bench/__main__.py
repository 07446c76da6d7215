"""python -m torch_swiftep.bench: the main job.

On a GPU with the CUDA extension: the one-process emulated world (throughput_emulated.py:
throughput schedule, plain-torch comparison, SM and token sweeps, plot; low_latency_emulated.py:
low-latency schedule). On a CPU-only machine (or with --cpu): an emulated world of gloo
processes running the CPU backend, both schedules timed and checked against the reference
(cpu_gloo_check.py).
"""
from __future__ import annotations

import argparse
import os
import sys

# Several ranks share this process and spin on each other's flags: lazy kernel loading would
# synchronize the context in the middle of that and stall them (see Communicator.emulated_world).
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")  # torch is imported after it, in main()

EPILOG = """\
Defaults that depend on the machine: a GPU run emulates 8 ranks with 4096 tokens/rank and sweeps
the low-latency schedule over 1, 8 and 128 tokens/rank; a CPU run uses 4 gloo processes, 256
tokens/rank (throughput) and 32 tokens/rank (low latency), or 64 and 8 with --quick.
Results: the tables on stdout; with --out, throughput.json, throughput.png and low_latency.json
(GPU) or cpu_backend.json and cpu_backend.png (CPU); plots need matplotlib.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torch_swiftep.bench",
                                description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=None,
                   help="ranks to emulate (default: 8 on a GPU, 4 on CPU)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per rank of the throughput schedule (default: 4096 on a GPU, "
                        "256 on CPU, 64 on CPU with --quick)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="tokens per rank of the low-latency schedule (default: a GPU sweeps 1, "
                        "8 and 128; CPU 32, 8 with --quick)")
    p.add_argument("--hidden", type=int, default=7168,
                   help="hidden size, elements per token row (default: %(default)s)")
    p.add_argument("--topk", type=int, default=8,
                   help="experts each token is routed to (default: %(default)s)")
    p.add_argument("--experts", type=int, default=256,
                   help="experts in the whole world, split evenly over the ranks "
                        "(default: %(default)s)")
    p.add_argument("--cpu", action="store_true",
                   help="use the CPU backend (gloo processes) even on a GPU")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the JSON results and PNG plots (default: none written)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: on a GPU fewer throughput sweep points (4 SMs/rank at "
                        "--tokens only), on CPU a smaller shape (fewer tokens per rank)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the comparison with the pure-torch reference (timings only)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--low-latency-only", action="store_true",
                      help="run only the low-latency (decode) schedule")
    only.add_argument("--throughput-only", action="store_true",
                      help="run only the throughput (prefill) schedule")
    p.add_argument("--trace", action="store_true",
                   help="GPU only: also print the low-latency kernels' phase trace (read from "
                        "GPU kernel timestamps; refused on CPU)")
    return p


def main(argv=None) -> int:
    import torch

    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("world", "tokens", "decode_tokens", "hidden", "topk", "experts"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.trace and args.throughput_only:
        parser.error("--trace traces the low-latency kernels: it cannot go with "
                     "--throughput-only")

    import torch_swiftep

    use_gpu = (not args.cpu and torch.cuda.is_available()
               and torch_swiftep.CUDA_EXTENSION_ERROR is None)
    if not use_gpu:
        if args.trace:
            parser.error("--trace reads the GPU kernels' timestamps: it needs a GPU and the "
                         "CUDA extension (this run uses the CPU backend)")
        if torch.cuda.is_available() and not args.cpu:
            print(f"CUDA extension unavailable ({torch_swiftep.CUDA_EXTENSION_ERROR}): "
                  "running the CPU backend")
        return _run_cpu(args, parser)
    return _run_gpu(args)


def _schedules(args) -> tuple:
    if args.low_latency_only:
        return ("low_latency",)
    if args.throughput_only:
        return ("throughput",)
    return ("throughput", "low_latency")


def _run_cpu(args, parser) -> int:
    from .. import Plan
    from . import cpu_gloo_check

    world = args.world or 4
    tokens = args.tokens or (64 if args.quick else 256)
    decode_tokens = args.decode_tokens or (8 if args.quick else 32)
    cases = cpu_gloo_check.world_cases(world, tokens, decode_tokens, args.hidden, args.topk,
                                       args.experts, _schedules(args))
    for schedule, case in cases.items():  # a bad shape fails here, not in every rank
        try:
            Plan.build(cpu_gloo_check.config(case, schedule), 0, world)
        except ValueError as exc:
            parser.error(f"this shape does not fit: {exc}")
    ok = cpu_gloo_check.run(world=world, tokens=tokens, decode_tokens=decode_tokens,
                            hidden=args.hidden, topk=args.topk, experts=args.experts,
                            schedules=tuple(cases), check=not args.no_check,
                            out_dir=args.out)
    return 0 if ok else 1


def _run_gpu(args) -> int:
    from . import low_latency_emulated, throughput_emulated

    ok = True
    world, tokens = args.world or 8, args.tokens or 4096
    schedules = _schedules(args)
    if "throughput" in schedules:
        sweep = dict(sms_per_rank=(4,), token_sweep=(tokens,)) if args.quick else {}
        ok &= throughput_emulated.run(world=world, tokens=tokens, hidden=args.hidden,
                                      topk=args.topk, experts=args.experts, out_dir=args.out,
                                      check=not args.no_check, **sweep)
    if "low_latency" in schedules:
        points = {}
        if args.decode_tokens:
            points = dict(token_points=(args.decode_tokens,))
        ok &= low_latency_emulated.run(world=world, hidden=args.hidden, topk=args.topk,
                                       experts=args.experts, out_dir=args.out,
                                       check=not args.no_check, trace=args.trace, **points)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
