"""python3 -m torch_swiftep.bench.pipeline_layer: the pipelined MoE layer, measured.

In a world of one (this process, its GPU or its CPU): measures each task through the layer's
own code paths (pipeline/calibrate.py: dispatch and combine at a few sizes and SM budgets, the
experts' grouped GEMMs and the shared expert alone and beside running communication), fits the
cost model, lets the solver choose, then times the layer unpipelined, by the solver's choice
(with and without the SM carve-out) and by every choice of a sweep (device time, the host
queued ahead; the first two also from an idle GPU, a cold start), and reports the speedup,
the solver's prediction error, the exposed communication of the measured timeline, the
measured GEMM interference against the ideal G / (G - s), whether the grouped GEMM honours the
carve-out, and where the experts' time goes; with --out, a JSON and a PNG of the measured
timeline beside the predicted one. On CPU the figures only prove the code runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import torch
from torch import nn

from .. import CommConfig, Communicator
from ..moe import ExpertParallelMoE
from ..pipeline import CostModel, Schedule, calibrate, equal_chunks, simulate, solve
from ..pipeline.carveout import carveout_supported
from ..pipeline.layer import PipelinedMoE
from ..pipeline.trace import TaskTracer

# hidden, expert FFN, top-k, experts, shared FFN. A world of one holds one EP8 rank's share:
# DeepSeek-V3's 256 experts / 8 = 32, Qwen3-MoE's 128 / 8 = 16, so the GEMM rows per expert and
# the bytes each call moves are one rank's at EP8 (the links are the GPU's memory here).
SHAPES = {"deepseek-v3": (7168, 2048, 8, 32, 2048), "qwen3-moe": (4096, 1536, 8, 16, 0),
          "tiny": (256, 128, 4, 16, 128)}
# Communication SM budgets calibrated, solved over and swept (CPU: any two, nothing is real).
# Up to 64: the unpipelined layer, whose GEMMs never run beside communication, may give its
# communication many SMs, and the baseline is the best of its budgets. In a world of one the
# "communication" is local copies whose time falls with every SM added (no link bound), so
# this baseline is the hard one for pipelining; --sms narrows the set.
CUDA_SMS = (8, 16, 24, 32, 48, 64)
CPU_SMS = (4, 8)


def build(shape: str, tokens: int, device: torch.device, group=None, seed: int = 0,
          moe_type=ExpertParallelMoE, **config):
    """(moe, its two Communicators, the shared expert or None, x [tokens, hidden]) of `shape`.
    group: the process group (None: a world of one); seed: x's draw; moe_type: called as
    moe_type(comm, ffn, dtype=...); config: CommConfig fields to override (num_experts,
    capacity, num_sms, ...)."""
    hidden, ffn, topk, experts, shared_ffn = SHAPES[shape]
    dtype = torch.bfloat16
    cfg = CommConfig(**{**dict(num_experts=experts, hidden=hidden, num_topk=topk,
                               max_tokens_per_rank=tokens, dtype=dtype), **config})
    comms = [Communicator(group, cfg, device=device) for _ in range(2)]
    moe = moe_type(comms[0], ffn, dtype=dtype)
    shared = None
    if shared_ffn:
        shared = nn.Sequential(nn.Linear(hidden, shared_ffn, bias=False), nn.SiLU(),
                               nn.Linear(shared_ffn, hidden, bias=False)).to(device, dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))
    x = x.to(device, dtype)
    return moe, comms, shared, x


def _sweep(layer, x, tokens, sms_options, order, device) -> dict:
    timed = {}
    for k in (1, 2, 4, 8):
        for s in sms_options:
            sched = Schedule(equal_chunks(tokens, k), s, order, 0.0, ())
            timed[(k, s)] = calibrate.time_us(lambda: layer(x, sched), device)
    return timed


def _traced(layer, x, schedule, device, hold_us=None) -> list:
    """The measured per-stream timeline of one forward; hold_us: host queued ahead (the GPU
    held that long), None: from an idle GPU (a cold start)."""
    layer.tracer = TaskTracer(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        if hold_us is not None:
            calibrate.hold_stream(torch.cuda.current_stream(), hold_us)
    layer(x, schedule)
    measured = layer.tracer.timeline()
    layer.tracer = None
    return measured


def _exposed(measured, chosen) -> float:
    """Fraction of the measured layer the compute stream waits on communication."""
    end = max(t.end_us for t in measured)
    return dataclasses.replace(chosen, predicted_us=end,
                               timeline=tuple(measured)).exposed_comm_us() / end


def _fit(layer, x, tokens, sms_options, total_sms) -> tuple:
    sizes = sorted({max(1, tokens // d) for d in (32, 16, 8, 4, 2, 1)})
    samples, coverage = calibrate.measure(layer, x, sizes, sms_options)
    model = CostModel.fit(samples, total_sms)
    errors = {}
    for sample, error in zip(samples, model.relative_errors(samples)):
        errors.setdefault(sample.task, []).append(abs(error))
    fit = {task: dict(max=max(e), mean=sum(e) / len(e)) for task, e in errors.items()}
    partial = [c for c in coverage if c[3] < 1.0]
    return model, samples, fit, partial


def _timings(layer, x, tokens, sms_options, chosen, device) -> dict:
    """The layer timed: the sweep, the best unpipelined, the solver's choice (also without the
    carve-out), all with the host queued ahead (device time, as inside a model), and from an
    idle GPU (cold: host-bound starts show), with a trace of each."""
    time_us = calibrate.time_us
    timed = _sweep(layer, x, tokens, sms_options, chosen.order, device)
    serial_sms = min(sms_options, key=lambda s: timed[(1, s)])
    serial = Schedule(equal_chunks(tokens, 1), serial_sms, chosen.order, 0.0, ())
    out = dict(timed=timed, serial_sms=serial_sms, serial_us=timed[(1, serial_sms)],
               chosen_us=time_us(lambda: layer(x, chosen), device))
    carveout, layer.carveout = layer.carveout, False
    out["chosen_no_carveout_us"] = time_us(lambda: layer(x, chosen), device)
    layer.carveout = carveout
    out["serial_cold_us"] = time_us(lambda: layer(x, serial), device, hold=False)
    out["chosen_cold_us"] = time_us(lambda: layer(x, chosen), device, hold=False)
    out["host_forward_us"] = calibrate.host_us(lambda: layer(x, chosen), device)
    out["measured"] = _traced(layer, x, chosen, device, out["host_forward_us"])
    out["measured_cold"] = _traced(layer, x, chosen, device)
    return out


def run(shape="tiny", tokens=256, out_dir=None, device=None, carveout=True,
        bound_rows=True, sms_options=None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    total_sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 132
    moe, comms, shared, x = build(shape, tokens, device)
    sms_options = tuple(sms_options or (CUDA_SMS if cuda else CPU_SMS))
    with torch.no_grad():
        layer = PipelinedMoE(moe, comms, shared, carveout=carveout, bound_rows=bound_rows)
        model, samples, fit, partial = _fit(layer, x, tokens, sms_options, total_sms)
        has_shared = shared is not None
        serial = solve(model, tokens, shared=has_shared, sms_options=sms_options,
                       fixed_chunks=1)
        chosen = solve(model, tokens, shared=has_shared, sms_options=sms_options)
        route_us = calibrate.time_us(lambda: moe.route(x), device)
        t = _timings(layer, x, tokens, sms_options, chosen, device)
        part = x[:chosen.chunks[0]]
        idx, w = moe.route(part)
        diagnostics = dict(
            host_dispatch_us=calibrate.host_us(
                lambda: comms[0].dispatch(part, idx, w, num_sms=chosen.comm_sms), device),
            carveout_supported=carveout_supported(), carveout_used=carveout and cuda,
            carveout_effect=calibrate.carveout_effect(layer, x, total_sms),
            interference=calibrate.interference(samples, total_sms), fit_errors=fit,
            partly_alone_samples=partial, route_us=route_us,
            experts_breakdown=[calibrate.experts_breakdown(layer, x, n)
                               for n in sorted({max(1, tokens // 8), tokens})])
    best = min(t["timed"].items(), key=lambda kv: kv[1])
    predicted_us = route_us + chosen.predicted_us  # the layer routes, then runs the schedule
    result = dict(
        shape=shape, tokens=tokens, device=str(device), cost_model=str(model),
        serial_us=t["serial_us"], serial_comm_sms=t["serial_sms"],
        chosen=dict(chunks=list(chosen.chunks), comm_sms=chosen.comm_sms, order=chosen.order),
        chosen_us=t["chosen_us"], chosen_no_carveout_us=t["chosen_no_carveout_us"],
        predicted_us=predicted_us,
        prediction_error=(predicted_us - t["chosen_us"]) / t["chosen_us"],
        serial_predicted_us=route_us + serial.predicted_us,
        sweep_best=dict(chunks=best[0][0], comm_sms=best[0][1], us=best[1]),
        sweep={f"{k}x{s}": us for (k, s), us in t["timed"].items()},
        speedup=t["serial_us"] / t["chosen_us"], vs_sweep_best=t["chosen_us"] / best[1],
        speedup_same_sms=t["timed"][(1, chosen.comm_sms)] / t["chosen_us"],
        sms_options=list(sms_options),
        exposed_comm_fraction=_exposed(t["measured"], chosen),
        serial_cold_us=t["serial_cold_us"], chosen_cold_us=t["chosen_cold_us"],
        speedup_cold=t["serial_cold_us"] / t["chosen_cold_us"],
        exposed_comm_fraction_cold=_exposed(t["measured_cold"], chosen),
        host_forward_us=t["host_forward_us"], bound_rows=layer.bound_rows,
        measured_timeline=[task._asdict() for task in t["measured"]],
        measured_timeline_cold=[task._asdict() for task in t["measured_cold"]], **diagnostics)
    _report(result, chosen, {"measured": t["measured"], "measured, cold start":
                             t["measured_cold"]}, model, out_dir)
    return result


def _diagnostics_lines(result) -> list:
    lines = []
    for task, by_sms in result["interference"].items():
        parts = [f"s={s} x{got:.3f} (ideal {ideal:.3f})" for s, (got, ideal) in by_sms.items()]
        lines.append(f"{task} beside communication / alone, carve-out "
                     f"{'on' if result['carveout_used'] else 'off'}: " + ", ".join(parts))
    effect = result["carveout_effect"]
    if effect is None:
        lines.append("SM carve-out: not available here (torch has no "
                     "_set_sm_carveout_experimental, or not CUDA): GEMMs see the whole GPU")
    else:
        verdict = "honoured" if effect > 1.3 else "IGNORED by this torch's grouped GEMM"
        lines.append(f"experts with half the SMs carved out, alone: x{effect:.2f} ({verdict})")
    lines.append(f"solver's choice without the carve-out: {result['chosen_no_carveout_us']:.0f} "
                 f"us (with: {result['chosen_us']:.0f} us); routing {result['route_us']:.0f} us "
                 "(in the prediction)")
    lines.append(f"host time to issue: one forward {result['host_forward_us']:.0f} us, one "
                 f"Communicator.dispatch {result['host_dispatch_us']:.0f} us (device idle "
                 "before each)")
    lines.append("fit |relative error| mean/max: " + ", ".join(
        f"{task} {e['mean']:.1%}/{e['max']:.1%}" for task, e in result["fit_errors"].items()))
    for b in result["experts_breakdown"]:
        floor_us = b["weight_bytes"] / 4.8e6  # bytes at H200's 4.8 TB/s, in us
        lines.append(
            f"experts, {b['tokens']} tokens ({b['rows']} of {b['capacity']} rows): whole window "
            f"{b['whole_window_us']:.0f} us, layer path {b['layer_path_us']:.0f} us = gate/up "
            f"GEMM {b['gate_up_gemm_us']:.0f} + SwiGLU {b['swiglu_us']:.0f} + down GEMM "
            f"{b['down_gemm_us']:.0f} + copy {b['copy_us']:.0f}; weights "
            f"{b['weight_bytes'] / 1e9:.2f} GB (>= {floor_us:.0f} us at 4.8 TB/s)")
    if result["partly_alone_samples"]:
        lines.append(f"note: {len(result['partly_alone_samples'])} beside-communication "
                     "samples outlasted their communication in some runs (partly alone)")
    return lines


def _report(result, chosen, measured: dict, model, out_dir) -> None:
    print(result["cost_model"])
    print(f"{result['shape']}, {result['tokens']} tokens, {result['device']}, device time with "
          f"the host queued ahead: unpipelined {result['serial_us']:.0f} us "
          f"({result['serial_comm_sms']} SMs); solver's choice {result['chosen']} "
          f"{result['chosen_us']:.0f} us (predicted {result['predicted_us']:.0f}, error "
          f"{result['prediction_error']:+.0%}); sweep best {result['sweep_best']}; speedup "
          f"{result['speedup']:.2f}x ({result['speedup_same_sms']:.2f}x over the unpipelined "
          f"layer at the choice's {result['chosen']['comm_sms']} SMs); exposed communication "
          f"{result['exposed_comm_fraction']:.0%}; solver/sweep best "
          f"{result['vs_sweep_best']:.3f}")
    print(f"  cold start (idle GPU, host issuing): unpipelined {result['serial_cold_us']:.0f} "
          f"us, solver's choice {result['chosen_cold_us']:.0f} us, speedup "
          f"{result['speedup_cold']:.2f}x, exposed communication "
          f"{result['exposed_comm_fraction_cold']:.0%}")
    for line in _diagnostics_lines(result):
        print("  " + line)
    if out_dir is None:
        return
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_layer.json").write_text(json.dumps(result, indent=1))
    _, predicted = simulate(model, chosen.work, chosen.comm_sms, chosen.order,
                            model.has("shared"), chosen.split)
    try:
        from .timeline_plot import plot_timelines
    except ImportError as exc:  # matplotlib missing
        print(f"no timeline plot: {exc}")
        return
    plot_timelines({**measured, "predicted": predicted}, out / "pipeline_layer.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m torch_swiftep.bench.pipeline_layer",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                   help="layer shape (default: tiny; deepseek-v3 and qwen3-moe need a GPU)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank (default: 256)")
    p.add_argument("--out", default=None, help="folder for the JSON and the timeline PNG")
    p.add_argument("--no-carveout", action="store_true",
                   help="GEMMs always see the whole GPU (no SM carve-out beside communication)")
    p.add_argument("--full-rows", action="store_true",
                   help="experts over the whole window (ExpertParallelMoE.experts as is), "
                        "not over each chunk's rows")
    p.add_argument("--sms", default=None,
                   help="communication SM budgets, comma-separated (default: "
                        f"{','.join(map(str, CUDA_SMS))} on a GPU; the first measurement used "
                        "4,8,16)")
    args = p.parse_args(argv)
    sms = tuple(int(v) for v in args.sms.split(",")) if args.sms else None
    run(args.shape, args.tokens, args.out, carveout=not args.no_carveout,
        bound_rows=not args.full_rows, sms_options=sms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
