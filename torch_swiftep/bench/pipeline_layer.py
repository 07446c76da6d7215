"""python3 -m torch_swiftep.bench.pipeline_layer: the pipelined MoE layer, measured.

In a world of one (this process, its GPU or its CPU): measures each task (dispatch and combine
at a few sizes and SM budgets, the experts' grouped GEMMs, the shared expert), fits the cost
model, lets the solver choose, then times the layer unpipelined, by the solver's choice and by
every choice of a sweep, and reports the speedup, the solver's prediction error and the exposed
communication of the measured timeline; with --out, a JSON and a PNG of the measured timeline
beside the predicted one. On CPU the figures only prove the code runs.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch
from torch import nn

from .. import CommConfig, Communicator
from ..moe import ExpertParallelMoE
from ..pipeline import CostModel, Sample, Schedule, equal_chunks, simulate, solve
from ..pipeline.layer import PipelinedMoE
from ..pipeline.trace import TaskTracer

# hidden, expert FFN, top-k, experts, shared FFN. A world of one holds one EP8 rank's share:
# DeepSeek-V3's 256 experts / 8 = 32, Qwen3-MoE's 128 / 8 = 16, so the GEMM rows per expert and
# the bytes each call moves are one rank's at EP8 (the links are the GPU's memory here).
SHAPES = {"deepseek-v3": (7168, 2048, 8, 32, 2048), "qwen3-moe": (4096, 1536, 8, 16, 0),
          "tiny": (256, 128, 4, 16, 128)}


def _time_us(fn, device, iters: int = 5) -> float:
    """Median microseconds of fn() (CUDA events on a GPU, the host clock on CPU)."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


def build(shape: str, tokens: int, device: torch.device):
    hidden, ffn, topk, experts, shared_ffn = SHAPES[shape]
    dtype = torch.bfloat16
    cfg = CommConfig(num_experts=experts, hidden=hidden, num_topk=topk,
                     max_tokens_per_rank=tokens, dtype=dtype)
    comms = [Communicator(None, cfg, device=device) for _ in range(2)]
    moe = ExpertParallelMoE(comms[0], ffn, dtype=dtype)
    shared = None
    if shared_ffn:
        shared = nn.Sequential(nn.Linear(hidden, shared_ffn, bias=False), nn.SiLU(),
                               nn.Linear(shared_ffn, hidden, bias=False)).to(device, dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return moe, comms, shared, x


def measure_samples(moe, shared, x, sizes, sms_options, total_sms) -> list[Sample]:
    """Task times of the layer's pieces. The GEMMs are timed alone on the whole device (their
    slowdown beside communication is the model's G / (G - s) term, not measured here)."""
    device, samples = x.device, []
    for n in sizes:
        part = x[:n]
        idx, w = moe.route(part)
        for s in sms_options:
            handle = moe.comm.dispatch(part, idx, w, num_sms=s)
            samples.append(Sample("dispatch", n, s, _time_us(
                lambda: moe.comm.dispatch(part, idx, w, num_sms=s), device)))
            out = moe.experts(handle.recv_x, handle.expert_offsets[1:])
            samples.append(Sample("combine", n, s, _time_us(
                lambda: moe.comm.combine(out, moe.comm.dispatch(part, idx, w, num_sms=s),
                                         num_sms=s), device) - samples[-1].us))
        handle = moe.comm.dispatch(part, idx, w)
        for s in sms_options:  # alone: the same time, as a sample at each budget
            samples.append(Sample("experts", n, s, _time_us(
                lambda: moe.experts(handle.recv_x, handle.expert_offsets[1:]), device)))
            if shared is not None:
                samples.append(Sample("shared", n, s, _time_us(lambda: shared(part), device)))
    return samples


def run(shape="tiny", tokens=256, out_dir=None, device=None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                 if device.type == "cuda" else 132)
    moe, comms, shared, x = build(shape, tokens, device)
    sms_options = (4, 8, 16) if device.type == "cuda" else (4, 8)
    sizes = sorted({max(1, tokens // 8), max(1, tokens // 2), tokens})
    with torch.no_grad():
        model = CostModel.fit(measure_samples(moe, shared, x, sizes, sms_options, total_sms),
                              total_sms)
        layer = PipelinedMoE(moe, comms, shared)
        serial = solve(model, tokens, shared=shared is not None, sms_options=sms_options,
                       fixed_chunks=1)
        chosen = solve(model, tokens, shared=shared is not None, sms_options=sms_options)
        timed = {}
        for k in (1, 2, 4, 8):
            for s in sms_options:
                chunks = equal_chunks(tokens, k)
                sched = Schedule(chunks, s, chosen.order, 0.0, ())
                timed[(k, s)] = _time_us(lambda: layer(x, sched), device)
        chosen_us = _time_us(lambda: layer(x, chosen), device)
        layer.tracer = TaskTracer(device)
        layer(x, chosen)
        measured = layer.tracer.timeline()
        layer.tracer = None
    serial_us = timed[(1, serial.comm_sms)]
    best = min(timed.items(), key=lambda kv: kv[1])
    compute_idle = Schedule(chosen.chunks, chosen.comm_sms, chosen.order,
                            max(t.end_us for t in measured), tuple(measured)).exposed_comm_us()
    result = dict(shape=shape, tokens=tokens, device=str(device), cost_model=str(model),
                  serial_us=serial_us, chosen=dict(chunks=list(chosen.chunks),
                                                   comm_sms=chosen.comm_sms, order=chosen.order),
                  chosen_us=chosen_us, predicted_us=chosen.predicted_us,
                  prediction_error=(chosen.predicted_us - chosen_us) / chosen_us,
                  sweep_best=dict(chunks=best[0][0], comm_sms=best[0][1], us=best[1]),
                  speedup=serial_us / chosen_us, vs_sweep_best=chosen_us / best[1],
                  exposed_comm_fraction=compute_idle / max(t.end_us for t in measured))
    _report(result, chosen, measured, model, out_dir)
    return result


def _report(result, chosen, measured, model, out_dir) -> None:
    print(result["cost_model"])
    print(f"{result['shape']}, {result['tokens']} tokens, {result['device']}: unpipelined "
          f"{result['serial_us']:.0f} us; solver's choice {result['chosen']} "
          f"{result['chosen_us']:.0f} us (predicted {result['predicted_us']:.0f}, error "
          f"{result['prediction_error']:+.0%}); sweep best {result['sweep_best']}; speedup "
          f"{result['speedup']:.2f}x; exposed communication "
          f"{result['exposed_comm_fraction']:.0%}")
    if out_dir is None:
        return
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_layer.json").write_text(json.dumps(result, indent=1))
    _, predicted = simulate(model, chosen.chunks, chosen.comm_sms, chosen.order,
                            model.has("shared"))
    try:
        from .timeline_plot import plot_timelines
    except ImportError as exc:  # matplotlib missing
        print(f"no timeline plot: {exc}")
        return
    plot_timelines({"measured": measured, "predicted": predicted}, out / "pipeline_layer.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m torch_swiftep.bench.pipeline_layer",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                   help="layer shape (default: tiny; deepseek-v3 and qwen3-moe need a GPU)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank (default: 256)")
    p.add_argument("--out", default=None, help="folder for the JSON and the timeline PNG")
    args = p.parse_args(argv)
    run(args.shape, args.tokens, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
