"""python3 -m torch_swiftep.bench.pipeline_multi_process: the pipelined MoE layer, ranks as
processes (rank r on GPU r % GPUs: one GPU each, or sharing one under MPS), each holding
num_experts / W experts.

    python3 -m torch_swiftep.bench.pipeline_multi_process --world 8 --shape deepseek-v3 \\
        --tokens 4096 --out DIR

Every rank makes the same communication calls in the same order: a check (pipelined equals
unpipelined; any failure stops every rank), calibration (fitted on each sample's slowest rank;
rank 0 solves and broadcasts the Schedule), timing (slope of chained CUDA graphs, else CUDA
events after a host barrier; slowest rank), one traced forward per rank. --carveout share sizes
a rank's GEMMs for its share of the SMs. docs/pipelining.md explains each choice.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time
from statistics import median
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from ..launch import rank_gpu, ranks_per_gpu
from ..moe import ExpertParallelMoE
from ..pipeline import CostModel, Sample, Schedule, calibrate, equal_chunks, simulate, solve
from ..pipeline.carveout import carveout_supported, sm_carveout
from ..pipeline.layer import PipelinedMoE
from ..pipeline.schedule import ORDERS, SPLITS, Task
from .multi_process import ENV, _int_list, mps_status
from .multi_process_records import slowest
from .pipeline_layer import SHAPES, _exposed, _traced, build
from .pipeline_sizing import (
    CHECK_TOLERANCE,
    CHUNK_COUNTS,
    CPU_DEVICE_SMS,
    CPU_SMS,
    CUDA_SMS,
    MODEL_EXPERTS,
    POLICIES,
    carveout_sms,
    check_chunkings,
    check_groupings,
    slowest_samples,
    summarize,
    usable_budgets,
    world_capacity,
)
from .rank_timing import REPEATS, after_failed_capture, agree, capture_chains, measure_chains


# -------------------------------------------------------------------- one rank's layer
def local_moe(comm, ffn: int, *, dtype) -> ExpertParallelMoE:
    """ExpertParallelMoE over comm drawing its local experts only (the same on every rank), not
    all of them (DeepSeek-V3's 256 in float32: 30 GB of host memory per rank); a full router."""
    cfg, local = comm.config, comm.num_local_experts
    few = SimpleNamespace(num_experts=local, hidden=cfg.hidden, num_topk=min(cfg.num_topk, local))
    moe = ExpertParallelMoE(SimpleNamespace(config=few, num_local_experts=local, rank=0,
                                            device=comm.device), ffn, dtype=dtype)
    router = torch.randn(cfg.num_experts, cfg.hidden, generator=torch.Generator().manual_seed(1))
    moe.router = nn.Parameter((router * cfg.hidden ** -0.5).to(comm.device, dtype),
                              requires_grad=False)
    moe.comm, moe.top_k = comm, cfg.num_topk
    return moe


class WorldLayer(PipelinedMoE):
    """PipelinedMoE whose GEMMs are carved out by `policy` for a GPU that `sharing` ranks share."""

    def __init__(self, moe, comms, shared, opts: dict):
        super().__init__(moe, comms, shared, bound_rows=opts["bound_rows"])
        self.policy, self.sms, self.sharing = opts["carveout"], opts["device_sms"], opts["sharing"]

    def _carve(self, sms: int):
        carve = carveout_sms(sms, self.sms, self.sharing, self.policy)
        return sm_carveout(carve) if self._streams.cuda else contextlib.nullcontext()


class _World:
    """This rank's side of the collective steps: every rank calls each in the same order."""

    def __init__(self, device: torch.device, opts: dict):
        self.group, self.device, self.cuda = dist.group.WORLD, device, device.type == "cuda"
        self.rank, self.repeats = self.group.rank(), opts["repeats"]
        self.methods: set = set()

    def barrier(self) -> None:
        dist.barrier(self.group)

    def gather(self, value) -> list:
        return agree(value, self.group)

    def largest(self, n: int) -> int:
        """The largest n over the ranks (calibrate.measure's clock: communication steps beside
        a GEMM sample, the same on every rank)."""
        return max(self.gather(n))

    def beside_us(self, fn, steps, layer) -> tuple:
        """calibrate.measure's clock: fn() beside the communication steps, on every rank."""
        return calibrate.time_beside_us(fn, steps, layer, self.device, self.repeats)

    def time_us(self, call) -> float:
        """This rank's us per call(), every rank running it at the same time."""
        if not self.cuda:
            self.methods.add("host clock after a barrier (CPU), slowest rank's median")
            times = []
            for _ in range(self.repeats):
                self.barrier()
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e6)
            return median(times)
        graphs, reason = None, None
        try:  # every rank captures first; replays only if every rank could
            graphs = capture_chains(call)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:200]
            torch.cuda.synchronize()
        failed = [r for r in self.gather(reason) if r]
        if failed:  # no eager fallback: after a failed capture the allocator keeps every
            del graphs  # block a side stream used until the process ends (out of memory)
            after_failed_capture()
            raise RuntimeError(f"rank {self.rank}: the pipelined forward could not be captured "
                               f"in a CUDA graph on every rank ({failed[0]}); not timed")
        self.methods.add("chained CUDA graphs (slope of SHORT and LONG forwards), slowest rank")
        slope = measure_chains(graphs, self.barrier, self.repeats)["slope_ms"]
        del graphs
        torch.cuda.empty_cache()  # the graphs' private pools
        return max(slope * 1e3, 1e-3)


# ------------------------------------------------------------------------ the rank's steps
def _rel_diff(y, want) -> float:
    return (y.float() - want.float()).abs().max().item() / (want.float().abs().max().item() or 1)


def _check(layer, x, opts, world) -> tuple[list, dict]:
    """The pipelined layer against the unpipelined one (module docstring). Chunks of experts
    sum a token's groups apart, so there even row-wise experts agree to rounding only."""
    n, s, moe, split = min(opts["check_tokens"], x.size(0)), opts["sms"][0], layer.moe, \
        opts["split"]
    xs, errors, worst, identical = x[:n], [], 0.0, True
    if split == "experts":
        whole = (moe.comm.num_local_experts,)
        chunkings, orders = check_groupings(whole[0]), ORDERS[:1]
    else:
        whole, chunkings, orders = (n,), check_chunkings(n), ORDERS

    def schedule(chunks, order):
        return Schedule(chunks, s, order, 0.0, (), split)
    moe.experts = lambda rows, offs, pool=None: rows * 1.5 - 0.25  # each row alone: bit-exact
    try:
        shared = nn.Identity() if layer.shared is not None else None  # row-wise too
        exact = WorldLayer(moe, layer.comms, shared, opts)
        want = moe(xs) + xs if shared is not None else moe(xs)
        for c in chunkings:
            for o in orders:
                y = exact(xs, schedule(c, o))
                if not (torch.equal(y, want) if split == "tokens"
                        else _rel_diff(y, want) <= CHECK_TOLERANCE):
                    errors.append(f"rank {world.rank}: row-wise experts, chunks {list(c)}, {o}: "
                                  "differs from the unpipelined layer")
    finally:
        del moe.experts
    for order in orders:
        want = layer(xs, schedule(whole, order))
        for chunks in chunkings:
            y = layer(xs, schedule(chunks, order))
            identical = identical and torch.equal(y, want)
            worst = max(worst, _rel_diff(y, want))
    if not worst <= CHECK_TOLERANCE:
        errors.append(f"rank {world.rank}: real experts: pipelined differs from unpipelined by "
                      f"{worst:.3g} of the output's max (tolerance {CHECK_TOLERANCE})")
    for comm in layer.comms:
        comm.check()
    return errors, dict(tokens=n, bit_identical=identical, max_rel_diff=worst)


def _decide(samples, world, opts):
    """Rank 0 fits each sample's slowest rank and broadcasts (chosen, unpipelined, model)."""
    every, box = world.gather([tuple(s) for s in samples]), [None]
    if world.rank == 0:
        model = CostModel.fit(slowest_samples(every), opts["device_sms"] // opts["sharing"])
        kw = dict(shared=model.has("shared"), sms_options=opts["sms"], split=opts["split"],
                  local_experts=opts["experts"] // opts["world"])
        box = [(solve(model, opts["tokens"], **kw),
                solve(model, opts["tokens"], fixed_chunks=1, **kw), model.to_json())]
    dist.broadcast_object_list(box, src=0, group=world.group)
    return box[0], every


def _time_layer(layer, x, chosen, sms_options, world) -> dict:
    """The sweep, the choice, and on CUDA the choice under each carve-out policy."""
    sweep, policy = {}, layer.policy
    units = layer.moe.comm.num_local_experts if chosen.split == "experts" else x.size(0)
    for k in CHUNK_COUNTS:
        for s in sms_options:
            sched = Schedule(equal_chunks(units, k), s, chosen.order, 0.0, (), chosen.split)
            sweep[(k, s)] = world.time_us(lambda: layer(x, sched))
    out = dict(sweep=sweep, chosen=world.time_us(lambda: layer(x, chosen)), policies={})
    for p in [p for p in POLICIES if p != policy] if world.cuda else []:
        layer.policy = p
        out["policies"][p] = world.time_us(lambda: layer(x, chosen))
    layer.policy, out["policies"][policy] = policy, out["chosen"]
    return out


def _trace(layer, x, chosen, world) -> tuple[list, float]:
    """One forward's per-stream timeline, every rank's host queued ahead; host us/forward."""
    host = calibrate.host_us(lambda: layer(x, chosen), x.device, iters=3)
    hold = max(world.gather(host))
    world.barrier()
    return _traced(layer, x, chosen, x.device, hold), host


def _rank(rank: int, world_size: int, opts: dict) -> dict:
    device = torch.device("cuda", rank_gpu(rank, torch.cuda.device_count())) \
        if opts["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the shared expert's weights: the same on every rank
    world, tokens = _World(device, opts), opts["tokens"]
    moe, comms, shared, x = build(opts["shape"], tokens, device, world.group, seed=1 + rank,
                                  moe_type=local_moe, num_experts=opts["experts"],
                                  capacity=opts["capacity"], num_sms=opts["sms"][0],
                                  combine_partials=opts.get("partials", False),
                                  dispatch_fanout=opts.get("fanout", False))
    layer = WorldLayer(moe, comms, shared, opts)
    with torch.no_grad():
        errors, check = _check(layer, x, opts, world)
        if any(world.gather(bool(errors))):  # every rank stops: nothing broken is timed
            return dict(errors=errors, check=check)
        units = moe.comm.num_local_experts if opts["split"] == "experts" else tokens
        sizes = sorted({max(1, units // d) for d in (32, 16, 8, 4, 2, 1)})
        # calibrate.measure's samples, collectively: the same calls on every rank
        samples, _ = calibrate.measure(layer, x, sizes, opts["sms"], split=opts["split"],
                                       clock=world)
        (chosen, serial, model), every = _decide(samples, world, opts)
        route_us = world.time_us(lambda: moe.route(x))
        timed = _time_layer(layer, x, chosen, opts["sms"], world)
        measured, host_us = _trace(layer, x, chosen, world)
        for comm in comms:
            comm.check()
    return dict(errors=[], check=check, every=every if rank == 0 else None, chosen=chosen,
                serial=serial, model=model, route_us=route_us, timed=timed,
                timeline=[tuple(t) for t in measured], exposed=_exposed(measured, chosen),
                makespan_us=max(t.end_us for t in measured), host_forward_us=host_us,
                methods=sorted(world.methods), bound_rows=layer.bound_rows)


# ------------------------------------------------------------------------------- the run
def aggregate(ranks: list) -> dict:
    """The world's figures from every rank's results: per figure the slowest rank."""
    first, route_us = ranks[0], max(r["route_us"] for r in ranks)
    chosen, model = first["chosen"], CostModel.from_json(first["model"])
    sweep, samples, fit = slowest([r["timed"]["sweep"] for r in ranks]), \
        slowest_samples(first["every"]), {}
    for sample, error in zip(samples, model.relative_errors(samples)):
        fit.setdefault(sample.task, []).append(abs(error))
    own = [CostModel.fit([Sample(*s) for s in mine], model.total_sms) for mine in first["every"]]
    slow = max(range(len(ranks)), key=lambda r: ranks[r]["makespan_us"])
    return dict(
        summarize(sweep, max(r["timed"]["chosen"] for r in ranks), chosen.comm_sms,
                  route_us + chosen.predicted_us),
        chosen=dict(chunks=list(chosen.chunks), comm_sms=chosen.comm_sms, order=chosen.order,
                    split=chosen.split),
        schedule_agreed=all(r["chosen"] == chosen for r in ranks), route_us=route_us,
        serial_predicted_us=route_us + first["serial"].predicted_us,
        sweep={f"{k}x{s}": us for (k, s), us in sweep.items()},
        chosen_by_carveout=slowest([r["timed"]["policies"] for r in ranks]),
        exposed_comm_fraction=ranks[slow]["exposed"], exposed_rank=slow,
        exposed_by_rank=[r["exposed"] for r in ranks],
        chosen_us_by_rank=[r["timed"]["chosen"] for r in ranks],
        own_model_predicted_us=[simulate(m, chosen.work, chosen.comm_sms, chosen.order,
                                         m.has("shared"), chosen.split)[0] for m in own],
        cost_model=str(model), cost_model_json=first["model"],
        fit_errors={t: dict(mean=sum(e) / len(e), max=max(e)) for t, e in fit.items()},
        bound_rows=first["bound_rows"], timing=sorted({m for r in ranks for m in r["methods"]}),
        host_forward_us=max(r["host_forward_us"] for r in ranks),
        measured_timeline_rank0=[Task(*t)._asdict() for t in first["timeline"]])


def rounded(value):
    """value with every float at 4 significant digits (the printed summary)."""
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return float(f"{value:.4g}") if isinstance(value, float) else value


def _report(r: dict, first, out_dir) -> None:
    """The sweep's table and every figure of the JSON but the long ones; the JSON; the PNG."""
    from .metrics import format_table

    if first is not None:
        print(r["cost_model"], f"{r['shape']}, {r['tokens']} tokens/rank, {r['world']} ranks, "
              "us per forward of the slowest rank:", sep="\n")
        print(format_table(["chunks"] + [f"{s} SMs/rank" for s in r["sms_per_rank"]],
                           [[k] + [r["sweep"][f"{k}x{s}"] for s in r["sms_per_rank"]]
                            for k in CHUNK_COUNTS]))
        for key, value in r.items():
            if key not in ("cost_model", "cost_model_json", "sweep", "measured_timeline_rank0"):
                print(f"  {key}: {rounded(value)}")
    print(f"check: {'FAILED' if r['errors'] else 'passed'}", *r["errors"][:10], sep="\nFAILED: ")
    if out_dir is None:
        return
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_multi_process.json").write_text(json.dumps(r, indent=1, default=str))
    try:
        from .timeline_plot import plot_timelines
    except ImportError as exc:  # matplotlib missing
        return print(f"no timeline plot: {exc}")
    if first is not None:
        chosen, model = first["chosen"], CostModel.from_json(first["model"])
        predicted = simulate(model, chosen.work, chosen.comm_sms, chosen.order,
                             model.has("shared"), chosen.split)[1]
        plot_timelines({"measured, rank 0": [Task(*t) for t in first["timeline"]],
                        "predicted": predicted}, out / "pipeline_multi_process.png")


def run(opts: dict) -> int:
    from ..launch import WorldError, run_world

    world, shape, tokens, cuda = opts["world"], opts["shape"], opts["tokens"], \
        opts["device"] == "cuda"
    g = torch.cuda.get_device_properties(0).multi_processor_count if cuda else CPU_DEVICE_SMS
    sharing = ranks_per_gpu(world, torch.cuda.device_count()) if cuda else world
    sms, dropped = usable_budgets(opts["sms"] or (CUDA_SMS if cuda else CPU_SMS), sharing, g)
    experts = opts.get("experts") or MODEL_EXPERTS[shape]
    capacity = world_capacity(tokens, SHAPES[shape][2], world, experts // world)
    opts = dict(opts, sms=sms, device_sms=g, capacity=capacity, sharing=sharing, experts=experts)
    mps = mps_status() if cuda else dict(active=False)
    result = dict(shape=shape, tokens=tokens, world=world, experts=experts, device=opts["device"],
                  device_sms=g, ranks_per_gpu=sharing, rank_sms=g // sharing, sms_per_rank=sms,
                  dropped=dropped, mps=mps,
                  carveout=opts["carveout"], carveout_supported=carveout_supported(),
                  split=opts["split"], partials=opts.get("partials", False),
                  fanout=opts.get("fanout", False), capacity=capacity, errors=[])
    print(f"pipelined layer, {shape} with {experts} experts, {world} ranks as processes, "
          f"{sharing} per {opts['device']} ({g} SMs, {g // sharing} per rank), {tokens} "
          f"tokens/rank, window {capacity} rows; MPS {'on' if mps['active'] else 'OFF'}",
          *dropped, sep="\n", flush=True)
    if cuda and sharing > 1 and not mps["active"]:
        print(f"{'!' * 100}\nWARNING: no MPS daemon: the ranks take turns on the GPU, the times "
              f"below MEAN NOTHING (`nvidia-cuda-mps-control -d` first)\n{'!' * 100}", flush=True)
    first = None
    try:
        if not sms:
            raise WorldError("no SM budget fits")
        ranks = run_world(world, _rank, opts, env=ENV if cuda else {}, timeout_s=opts["timeout"])
        result.update(errors=[e for r in ranks for e in r["errors"]],
                      check=[r["check"] for r in ranks])
        if not result["errors"]:
            first = ranks[0]
            result.update(aggregate(ranks))
            result["errors"] += [] if result["schedule_agreed"] else ["ranks ran other schedules"]
    except WorldError as exc:
        result["errors"] = [f"not run: {exc}"]
    _report(result, first, opts["out"])
    return 1 if result["errors"] else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m torch_swiftep.bench.pipeline_multi_process",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    add = p.add_argument
    add("--world", type=int, default=8, help="ranks, one process each (default: 8)")
    add("--shape", choices=list(MODEL_EXPERTS), default="deepseek-v3", help="default: %(default)s")
    add("--tokens", type=int, default=4096, help="tokens per rank (default: 4096)")
    add("--experts", type=int, default=None, help="experts of the world (default: the model's; "
        "W x 32 keeps an EP8 DeepSeek-V3 rank's 32 in a smaller world)")
    add("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: CPU backend over gloo")
    add("--sms", type=_int_list, default=None, metavar="LIST", help="communication SMs per rank "
        f"(default: {','.join(map(str, CUDA_SMS))}; those that do not fit are dropped)")
    add("--check-tokens", type=int, default=256, help="tokens/rank of the check (default: 256)")
    add("--repeats", type=int, default=REPEATS, help=f"replays per figure (default: {REPEATS})")
    add("--carveout", choices=POLICIES, default="share", help="GEMM SM carve-out (default: share)")
    add("--bound-rows", action="store_true", help="experts over each chunk's row bound")
    add("--partials", action="store_true", help="CommConfig(combine_partials=True): the "
        "combine reads the experts' fresh output in place (no staging copy)")
    add("--fanout", action="store_true", help="CommConfig(dispatch_fanout=True): one row per "
        "(token, remote rank) crosses the link, fanned out there")
    add("--split", choices=SPLITS, default="tokens", help="chunks of tokens (bit-identical) or "
        "of each rank's experts (each expert's GEMMs once; equal to rounding); default: tokens")
    add("--timeout", type=float, default=1800.0, help="seconds for the world (default: 1800)")
    add("--out", default=None, metavar="DIR", help="folder for the JSON and the PNG")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("world", "tokens", "check_tokens", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    experts = args.experts or MODEL_EXPERTS[args.shape]
    if experts <= 0 or experts % args.world:
        p.error(f"--world {args.world} must divide the experts, got --experts {experts}")
    from .. import CUDA_EXTENSION_ERROR as error

    if args.device == "cuda" and (error or not torch.cuda.is_available()):
        print(f"needs a CUDA GPU and the extension ({error or 'no GPU'}); nothing run")
        return 2
    return run(dict(vars(args), bound_rows=True if args.bound_rows else None))


if __name__ == "__main__":
    sys.exit(main())
