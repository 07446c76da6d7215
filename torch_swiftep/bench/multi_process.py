"""Throughput schedule with one process per rank (as in production), peers in the same run.
Rank r runs on GPU r % GPUs: one GPU each on a host with enough of them (NVLink between them),
else several ranks share a GPU, which needs the MPS daemon (`nvidia-cuda-mps-control -d`, root;
the gpu_round step `multi_process` starts it): without MPS the processes take turns on the GPU
and the times mean nothing (the run says so, loudly).

    python3 -m torch_swiftep.bench.multi_process --world 8 --tokens 4096 --sms 2,4,8,16 --out DIR

Per SM budget, the calls as users make them: dispatch; combine zero-copy (the experts wrote
into comm.combine_buffer()); combine from the experts' own tensor (allocated as a grouped GEMM's
output: combine stages it with its SMs); combine after a torch copy of that tensor into the
window (the copy over the whole GPU, as ExpertParallelMoE does outside torch.compile; the copy
is counted in the combine); combine from a tensor allocated in comm.expert_output_pool() (torch's
symmetric memory pool: combine(symmetric=True) reads it in place on every owner, no staging);
the step (dispatch + combine) from the experts' own tensor and from the pool's.

Timing is aligned on the device, not by a host barrier: each rank captures chains of SHORT and
LONG back-to-back calls in CUDA graphs, replays each after a host barrier, times it with CUDA
events and takes the slope (t_long - t_short) / (LONG - SHORT): every call waits for every peer
on the device, so the start skew cancels. Median of --repeats replays, the slowest rank;
combine = (dispatch + combine chain) - (dispatch chain). Before timing, every rank checks every
combine mode at every budget at --check-tokens against testing's reference (the symmetric pool's
result also bit for bit against the plain combine's of the same tensor).

Ceiling: the library's bulk copy at the SM count one GPU's ranks use together (copy_ceiling.py),
measured before the ranks start, set against the least bytes of that GPU's ranks (with a GPU per
rank also the link: the copy engine's GPU 0 -> GPU 1 rate, against the rows the busiest rank sends
or pulls over it); each op's least bytes (read + write, metrics.py) per second is quoted as a
fraction of its read + write rate. algbw: received (token, rank) pairs x hidden x 2 bytes / time per
rank (DeepEP's convention). Peers, as ratios to swiftep at the same budget: DeepEP's intranode
Buffer (deepep_peer.py), torch's NVSHMEM all_to_all_vdev_2d (torch_a2a_peer.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

from ..launch import NO_MULTICAST_ENV, rank_gpu, ranks_per_gpu
from .multi_process_records import (
    PEERS,
    build_records,
    fit_budgets,
    format_report,
    per_rank_ops,
    slowest,
)
from .rank_timing import LONG, REPEATS, SHORT, agree, capture_chains, measure_chains

# Ranks as processes on one GPU (tests/gpu_world.py's environment): multicast off.
ENV = {"TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1", **NO_MULTICAST_ENV,
       "CUDA_MODULE_LOADING": "LAZY"}
# ------------------------------------------------------------------------- inputs, one rank
def rank_inputs(shape: dict, tokens: int, rank: int, device, seed: int) -> tuple:
    """(x, topk_idx, topk_weights) of one rank on device, and every rank's topk_idx (CPU): the
    world's inputs as testing draws them (uniform routing, bf16)."""
    import torch

    from .. import testing

    case = testing.Case(seed, torch.bfloat16, shape["hidden"], shape["topk"], "uniform",
                        shape["experts"], (tokens,) * shape["world"])
    inp = case.inputs()
    mine = (inp.xs[rank], inp.topk_idx[rank], inp.topk_weights[rank])
    return tuple(t.to(device) for t in mine) + (inp.topk_idx,)


def _check_rank(comms, rank: int, shape: dict, budgets, device) -> list[str]:
    """Every combine mode at every SM budget, at check_tokens per rank, against testing's
    reference (dispatch bit-exact, combine of the fake expert within testing.close); the
    symmetric pool's combine also bit for bit against the plain combine of the same rows.
    comms: (plain, symmetric): once a communicator's ranks agree on symmetric combines it
    refuses plain ones, so the symmetric pool's calls have a communicator of their own."""
    import torch

    from .. import testing

    tokens = min(shape["check_tokens"], shape["tokens"])
    case = testing.Case(1, torch.bfloat16, shape["hidden"], shape["topk"], "uniform",
                        shape["experts"], (tokens,) * shape["world"])
    exp = testing.expected(case)
    x, idx, w, _ = exp.rank_inputs(rank, device)
    plain_comm, sym_comm = comms
    errors = []
    for sms in budgets:
        plain = None
        for mode in ("zero copy", "own tensor", "symmetric pool"):
            comm = sym_comm if mode == "symmetric pool" else plain_comm
            handle = comm.dispatch(x, idx, w, num_sms=sms)
            out = testing.expert_output(handle, torch.bfloat16)
            if mode == "zero copy":
                out = comm.combine_buffer().copy_(out)
            elif mode == "symmetric pool":  # a fresh pool tensor, as the experts' GEMM's
                with comm.expert_output_pool():
                    pooled = torch.empty_like(out)
                out = pooled.copy_(out)
            y = comm.combine(out, handle, num_sms=sms, symmetric=mode == "symmetric pool")
            comm.check()
            errors += [f"{sms} SMs/rank, {mode}: {e}"
                       for e in testing.check_step(rank, exp, handle, y)]
            plain = y if mode == "own tensor" else plain
        msg = testing.same_bits(y, plain.cpu())
        if msg:
            errors.append(f"{sms} SMs/rank: symmetric pool differs from the plain combine: {msg}")
    return errors


def _swiftep_rank(rank, world, shape, budgets, chain, repeats):
    import torch
    import torch.distributed as dist

    from .. import CommConfig, Communicator, testing
    from .metrics import RoutingBytes

    device, group = torch.device("cuda", rank_gpu(rank, torch.cuda.device_count())), \
        dist.group.WORLD
    torch.cuda.set_device(device)
    rows = shape["tokens"] * shape["topk"]  # per rank under uniform routing
    config = CommConfig(num_experts=shape["experts"], hidden=shape["hidden"],
                        num_topk=shape["topk"], max_tokens_per_rank=shape["tokens"],
                        dtype=torch.bfloat16, capacity=max(rows + rows // 4, 1024),
                        timeout_s=60.0, dispatch_fanout=shape.get("fanout", False),
                        combine_partials=shape.get("partials", False))
    comm = Communicator(group, config, device=device)
    sym_comm = Communicator(group, config, device=device)  # combine(symmetric=True) only
    progress = print if rank == 0 else (lambda *a, **k: None)
    progress("  swiftep: communicators built; checking", flush=True)
    errors = _check_rank((comm, sym_comm), rank, shape, budgets, device) \
        if shape["check_tokens"] else []
    progress("  swiftep: checked; drawing the timed inputs", flush=True)
    if any(agree(errors, group)):  # every rank stops together: a broken kernel is never timed
        return dict(errors=errors, routing=None, slopes={})
    x, idx, w, _ = rank_inputs(shape, shape["tokens"], rank, device, seed=shape["tokens"])
    routing = RoutingBytes.of(idx, shape["experts"], world, rank)
    handle = comm.dispatch(x, idx, w, num_sms=budgets[0])
    out = testing.expert_output(handle, torch.bfloat16)  # the fake expert's rows, once
    comm.combine_buffer().copy_(out)  # zero copy: the experts wrote into the window
    window = comm.combine_buffer()
    own = torch.empty_like(out).copy_(out)  # the experts' own tensor, as a grouped GEMM's
    comm.combine(own, handle, num_sms=budgets[0])
    with sym_comm.expert_output_pool():  # as own, from the symmetric pool (its GEMM's output)
        sym = torch.empty_like(out)
    sym.copy_(out)
    handle = sym_comm.dispatch(x, idx, w, num_sms=budgets[0])
    sym_comm.combine(sym, handle, num_sms=budgets[0], symmetric=True)
    comm.check()
    sym_comm.check()
    if sym_comm._segments._locate(sym.data_ptr(), sym.numel() * sym.element_size()) is None:
        print(f"rank {rank}: WARNING: the symmetric pool's tensor is in no reserved segment: "
              "its combine rows below include the staging copy", flush=True)
    slopes = {}
    for sms in budgets:
        calls = {"dispatch": lambda: comm.dispatch(x, idx, w, num_sms=sms)}
        calls["pair"] = lambda: comm.combine(comm.combine_buffer(), calls["dispatch"](),
                                             num_sms=sms)
        calls["pair_own"] = lambda: comm.combine(own, calls["dispatch"](), num_sms=sms)

        def pair_copy(sms=sms):  # the copy after the dispatch: peers read the window until then
            handle = comm.dispatch(x, idx, w, num_sms=sms)
            window.copy_(own)
            return comm.combine(window, handle, num_sms=sms)
        calls["pair_copy"] = pair_copy
        calls["pair_sym"] = lambda: sym_comm.combine(
            sym, sym_comm.dispatch(x, idx, w, num_sms=sms), num_sms=sms, symmetric=True)
        slopes[sms] = {}
        for name, call in calls.items():
            progress(f"  swiftep, {sms} SMs/rank: {name}: capturing", flush=True)
            graphs = capture_chains(call, chain)
            progress(f"  swiftep, {sms} SMs/rank: {name}: replaying", flush=True)
            slopes[sms][name] = measure_chains(graphs, lambda: dist.barrier(group), repeats,
                                               chain)
            del graphs
        comm.check()
        if rank == 0:
            print(f"  swiftep, {sms} SMs/rank: measured", flush=True)
    return dict(errors=[], routing=dataclasses.asdict(routing), slopes=slopes)


# --------------------------------------------------------------------------------- the run
def mps_status() -> dict:
    """Whether the MPS control daemon is up (its control pipe exists), and the GPU's compute
    mode as nvidia-smi reports it (informational)."""
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    active = os.path.exists(os.path.join(pipe, "control"))
    try:
        mode = subprocess.run(["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        mode = "unknown (nvidia-smi failed)"
    return dict(active=active, control_pipe=os.path.join(pipe, "control"), compute_mode=mode)


def _swiftep_world(shape, budgets, args) -> tuple[dict | None, dict | None, list]:
    """({sms: {op: ms}} of the slowest rank, the world's bytes, errors)."""
    from ..launch import WorldError, run_world
    from .metrics import RoutingBytes, combine_min_bytes, dispatch_min_bytes

    try:
        ranks = run_world(shape["world"], _swiftep_rank, shape, budgets, args.chain,
                          args.repeats, env=ENV, timeout_s=args.timeout)
    except WorldError as exc:
        return None, None, [f"swiftep world failed: {exc}"]
    errors = [f"rank {r}: {e}" for r, res in enumerate(ranks) for e in res["errors"]]
    if errors:
        return None, None, errors
    by_sms = {sms: slowest([per_rank_ops({k: v["slope_ms"] for k, v in r["slopes"][sms].items()})
                            for r in ranks]) for sms in budgets}
    routing = [RoutingBytes(**r["routing"]) for r in ranks]
    row = shape["hidden"] * 2
    sent = [r.remote_pairs if shape.get("fanout") else r.remote_rows for r in routing]
    world_bytes = dict(pairs_per_rank=sum(r.token_rank_pairs for r in routing) / len(routing),
                       dispatch=sum(dispatch_min_bytes(r, row) for r in routing),
                       combine=sum(combine_min_bytes(r, row) for r in routing),
                       # the most one rank's GPU sends (dispatch) or pulls (combine) over its link
                       link_dispatch=max(sent) * row,
                       link_combine=max(r.remote_pairs if shape.get("partials")
                                        else r.remote_rows for r in routing) * row)
    raw = {sms: [r["slopes"][sms] for r in ranks] for sms in budgets}
    return by_sms, dict(world_bytes=world_bytes, raw=raw), []


def run(args) -> int:
    import torch

    from .copy_ceiling import copy_ceiling_gbps

    world = args.world
    shape = dict(world=world, tokens=args.tokens, hidden=args.hidden, topk=args.topk,
                 experts=args.experts, check_tokens=0 if args.no_check else args.check_tokens,
                 fanout=args.fanout, partials=args.partials)
    props, gpus = torch.cuda.get_device_properties(0), torch.cuda.device_count()
    sharing, mps = ranks_per_gpu(world, gpus), mps_status()
    print(f"torch_swiftep multi-process benchmark on {props.name} ({props.multi_processor_count} "
          f"SMs): {world} ranks as processes on {min(world, gpus)} GPU(s), {sharing} per GPU, "
          f"{args.tokens} tokens/rank, hidden {args.hidden}, top-{args.topk}, {args.experts} "
          f"experts, bf16, uniform routing; MPS {'on' if mps['active'] else 'OFF'} (compute mode "
          f"{mps['compute_mode']})", flush=True)
    if sharing > 1 and not mps["active"]:
        bar = "!" * 100
        print(f"{bar}\nWARNING: no MPS daemon (no control pipe {mps['control_pipe']}). Without "
              "MPS the rank processes take turns on the GPU (time slicing): the times below "
              "MEAN NOTHING.\nStart it first (`nvidia-cuda-mps-control -d`, root) or run "
              f"`STEPS=multi_process bash scripts/gpu_round.sh OUT`.\n{bar}", flush=True)
    budgets, dropped = fit_budgets(args.sms, sharing, props.multi_processor_count)
    for message in dropped:
        print(message)
    result = dict(device=props.name, device_sms=props.multi_processor_count, gpus=gpus,
                  ranks_per_gpu=sharing, mps=mps, **shape,
                  dtype="bfloat16", routing="uniform", sms_per_rank=budgets, dropped=dropped,
                  chain=list(args.chain), repeats=args.repeats, timing=__doc__.split("\n\n")[3])
    if not budgets:
        return _finish(result, [], {}, ["no SM budget fits"], args.out)
    ceiling = copy_ceiling_gbps(sorted({sms * sharing for sms in budgets}))  # before the ranks
    result["ceiling_payload_gbps"] = ceiling
    if sharing == 1 and gpus >= 2:  # a GPU per rank: the link's rate, GPU 0 -> GPU 1
        from .multi_gpu_vs_nccl import p2p_copy_gbps

        result["link_gbps"] = p2p_copy_gbps()
        print(f"link ceiling: the copy engine moves {result['link_gbps']:.0f} GB/s one way "
              "GPU 0 -> GPU 1", flush=True)
    print("copy ceiling (payload GB/s at the total SM count): " + (", ".join(
        f"{n} SMs {g:.0f}" for n, g in sorted(ceiling.items())) or "not measured"), flush=True)
    swiftep, extra, errors = _swiftep_world(shape, budgets, args)
    if errors:
        return _finish(result, [], {}, errors, args.out)
    result.update(swiftep_ms=swiftep, **extra)
    peers = _run_peers(shape, budgets, args)
    records = build_records(swiftep, extra["world_bytes"], ceiling, world, args.hidden, peers,
                            sharing, result.get("link_gbps"))
    return _finish(result, records, peers, [], args.out)


def _run_peers(shape, budgets, args) -> dict:
    from . import deepep_peer, torch_a2a_peer  # each imports its library only when it runs

    modules = {"deepep": deepep_peer, "torch": torch_a2a_peer}
    peers = {name: modules[name].run(shape, budgets, args.chain, args.repeats, args.timeout)
             for name in args.peers}
    if peers.get("deepep", {}).get("permuted_by_sms"):  # DeepEP as its users run it
        peers["deepep+permute"] = dict(status="ran", by_sms=peers["deepep"]["permuted_by_sms"],
                                       notes=[deepep_peer.PERMUTE_NOTE])
    return peers


def _finish(result, records, peers, errors, out_dir) -> int:
    if records:
        print(format_report(records, peers))
        print("vs X: X's ms / swiftep's ms at the same SMs/rank (> 1: swiftep faster); of "
              "ceiling: least bytes (read + write) / time / the bulk copy's read + write rate at "
              "the same total SMs; of link (a GPU per rank): the bytes the busiest rank moves "
              "over its link per second over the copy engine's one-way rate; step rows count "
              "both directions; symmetric pool: the "
              "experts' tensor from comm.expert_output_pool(), read in place by "
              "combine(symmetric=True)")
    for e in errors[:10]:
        print("FAILED:", e)
    print("check:", "FAILED" if errors else ("passed" if result["check_tokens"] else "skipped"))
    result.update(records=records, peers=peers, errors=errors)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "multi_process.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {path}")
    return 1 if errors else 0


def _int_list(text: str) -> list[int]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or not all(v.isdigit() and int(v) > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated: {text!r}")
    return [int(v) for v in values]


def _peer_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip() not in ("", "none")]
    if any(n not in PEERS for n in names):
        raise argparse.ArgumentTypeError(f"peers are {', '.join(PEERS)} or none, got {text!r}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m torch_swiftep.bench.multi_process",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--world", type=int, default=8, help="ranks, one process each (default: 8)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (default: 4096)")
    p.add_argument("--hidden", type=int, default=7168, help="hidden size (default: 7168)")
    p.add_argument("--topk", type=int, default=8, help="experts per token (default: 8)")
    p.add_argument("--experts", type=int, default=256,
                   help="experts in the world, split evenly over the ranks (default: 256)")
    p.add_argument("--sms", type=_int_list, default=[2, 4, 8, 16], metavar="LIST",
                   help="SM budgets per rank (default: 2,4,8,16); those whose world x SMs "
                        "exceed the GPU's SMs are dropped")
    p.add_argument("--check-tokens", type=int, default=256,
                   help="tokens per rank of the check before timing (default: 256)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--fanout", action="store_true",
                   help="CommConfig(dispatch_fanout=True): a token's row crosses once per rank")
    p.add_argument("--partials", action="store_true",
                   help="CommConfig(combine_partials=True): one partial per (token, rank) "
                        "crosses back, expert outputs read where they are")
    p.add_argument("--repeats", type=int, default=REPEATS,
                   help=f"timed replays of each chain, median (default: {REPEATS})")
    p.add_argument("--chain", type=_int_list, default=[SHORT, LONG], metavar="SHORT,LONG",
                   help=f"calls per chain graph (default: {SHORT},{LONG})")
    p.add_argument("--peers", type=_peer_list, default=list(PEERS), metavar="LIST",
                   help="peers in the same run: deepep, torch or none (default: deepep,torch)")
    p.add_argument("--timeout", type=float, default=1200.0,
                   help="seconds each world of processes may take (default: 1200)")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for multi_process.json")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("world", "tokens", "hidden", "topk", "experts", "check_tokens", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.world < 2 or args.experts % args.world:
        p.error(f"--experts ({args.experts}) must split evenly over --world ({args.world} >= 2)")
    if len(args.chain) != 2 or args.chain[0] >= args.chain[1]:
        p.error(f"--chain takes SHORT,LONG with SHORT < LONG, got {args.chain}")
    import torch

    import torch_swiftep

    if not torch.cuda.is_available() or torch_swiftep.CUDA_EXTENSION_ERROR is not None:
        print("multi-process benchmark: needs a CUDA GPU and the CUDA extension "
              f"(extension: {torch_swiftep.CUDA_EXTENSION_ERROR or 'loaded'}); nothing run")
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
