"""python3 -m torch_swiftep.pipeline: the solver's prediction for a standard MoE layer.

The cost model's communication terms are FITTED from a measured benchmark JSON
(docs/results/throughput.json by default: dispatch and combine times at 1-4 SMs per rank and
512-4096 tokens per rank, hidden 7168), scaled by hidden size; the terms that were not measured
are ASSUMED and printed as such: the grouped-GEMM rate, the NVLink rate of one GPU per rank,
the GPU's SM count, and the GEMMs' slowdown beside communication (the ideal G / (G - s)). The
output is a prediction, not a measurement.

--measured PATH --to-world W instead starts from a cost model FITTED on a GPU per rank (the
multi-process pipeline benchmark's JSON, e.g. docs/results/pipeline_mp_2gpu_deepseek-v3.json,
whose ranks held an EP8 rank's experts) and moves it to W ranks: a rank's rows, expert compute
and SM work stay the same, the share of its rows that crosses NVLink goes from (W0 - 1) / W0 to
(W - 1) / W, so the communication tasks' per-token (link) terms scale by that ratio. ASSUMED: a
GPU reaches its W - 1 peers through NVSwitch at the rate it reached one.
"""
from __future__ import annotations

import argparse
import json
import pathlib

from . import CostModel, Sample, solve

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "results" / "throughput.json"
# name: (hidden, expert FFN width, top-k, shared-expert FFN width or 0)
MODELS = {"deepseek-v3": (7168, 2048, 8, 2048), "qwen3-moe": (4096, 1536, 8, 0)}


def fit_from_results(path: pathlib.Path, hidden: int, gemm_tflops: float, link_gbps: float,
                     total_sms: int, model: str) -> CostModel:
    data = json.loads(path.read_text())
    scale = hidden / data["hidden"]  # bytes per token scale with the hidden size
    measured_hidden, topk = data["hidden"], data["topk"]
    samples = []
    # The layer's experts return a tensor of their own, so its combine is the benchmark's
    # "combine, own tensor" where the results have it (the zero-copy combine otherwise).
    own = any(r["op"] == "combine, own tensor" for r in data["records"])
    ops = {"dispatch": "dispatch", ("combine, own tensor" if own else "combine"): "combine"}
    for r in data["records"]:
        if r["op"] not in ops:
            continue
        # the per-SM term as measured; the link term (one GPU per rank, (W-1)/W of the rows
        # leave it) is added below from the assumed NVLink rate
        samples.append(Sample(ops[r["op"]], r["tokens"], r["sms_per_rank"],
                              r["ms"] * 1e3 * scale))
    world = data["world"]
    fitted = CostModel.fit(samples, total_sms)
    link_us_per_token = topk * measured_hidden * 2 * scale * (world - 1) / world / link_gbps / 1e3
    coefficients = {task: (c0, c1, c2 + link_us_per_token, c3)
                    for task, (c0, c1, c2, c3) in fitted.coefficients.items()}
    hidden_, ffn, k, shared_ffn = MODELS[model]
    flops_per_row = 3 * 2 * hidden_ * ffn  # gate, up and down projections
    # ASSUMED: beside communication the GEMMs slow down by exactly G / (G - s) (interference
    # term = the per-token term), no floor (the benchmark measures both)
    per_token = k * flops_per_row / (gemm_tflops * 1e6)
    coefficients["experts"] = (20.0, per_token, per_token, 0.0)
    if shared_ffn:
        per_token = 3 * 2 * hidden_ * shared_ffn / (gemm_tflops * 1e6)
        coefficients["shared"] = (10.0, per_token, per_token, 0.0)
    return CostModel(total_sms, coefficients)


def moved_to_world(path: pathlib.Path, world: int) -> CostModel:
    """The fitted CostModel of a pipeline benchmark JSON, its link terms moved to `world` ranks
    (module docstring)."""
    data = json.loads(path.read_text())
    model, w0 = CostModel.from_json(data["cost_model_json"]), data["world"]
    if w0 < 2 or world < 2:
        raise ValueError(f"both worlds need 2+ ranks to have a link term: {w0} -> {world}")
    factor = ((world - 1) / world) / ((w0 - 1) / w0)
    return CostModel(model.total_sms, {
        task: (c[0], c[1], c[2] * factor, c[3]) if task in ("dispatch", "combine") else c
        for task, c in model.coefficients.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m torch_swiftep.pipeline",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="deepseek-v3",
                   help="layer shape (default: deepseek-v3)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (default: 4096)")
    p.add_argument("--results", type=pathlib.Path, default=RESULTS,
                   help="measured throughput JSON the communication terms are fitted from")
    p.add_argument("--gemm-tflops", type=float, default=600.0,
                   help="ASSUMED grouped-GEMM rate on the whole GPU (default: 600, bf16 H200)")
    p.add_argument("--link-gbps", type=float, default=370.0,
                   help="ASSUMED NVLink rate per direction per GPU (default: 370)")
    p.add_argument("--total-sms", type=int, default=132, help="SMs of the GPU (default: 132)")
    p.add_argument("--measured", type=pathlib.Path, default=None, metavar="PATH",
                   help="a pipeline benchmark JSON whose fitted model to start from (then "
                        "--model, --results, --gemm-tflops, --link-gbps are not used)")
    p.add_argument("--to-world", type=int, default=8,
                   help="with --measured: the world to move its link terms to (default: 8)")
    p.add_argument("--experts-fixed-us", type=float, default=None, metavar="US",
                   help="ASSUMED fixed cost per chunk of the experts instead of the model's (a "
                        "what-if: how small it must be for pipelining to pay)")
    args = p.parse_args(argv)
    split = dict(split="tokens")
    if args.measured is not None:
        model = moved_to_world(args.measured, args.to_world)
        data = json.loads(args.measured.read_text())
        if data.get("split", "tokens") == "experts":  # the model was fitted on expert groups
            split = dict(split="experts", local_experts=data["experts"] // data["world"])
        print(f"{args.measured.name}: every term FITTED on a GPU per rank, the link terms moved "
              f"to {args.to_world} ranks (ASSUMED: the same NVLink rate to every peer); chunks "
              f"of {split['split']}")
    else:
        model = fit_from_results(args.results, MODELS[args.model][0], args.gemm_tflops,
                                 args.link_gbps, args.total_sms, args.model)
        print(f"{args.model}, {args.tokens} tokens/rank; communication fitted from "
              f"{args.results} (measured), GEMM {args.gemm_tflops:g} TFLOP/s (G / (G - s) beside "
              f"communication) and NVLink {args.link_gbps:g} GB/s ASSUMED")
    if args.experts_fixed_us is not None:
        e = model.coefficients["experts"]
        model = CostModel(model.total_sms, {**model.coefficients,
                                            "experts": (args.experts_fixed_us,) + e[1:]})
        print(f"ASSUMED: the experts' fixed cost per chunk is {args.experts_fixed_us:g} us")
    shared = model.has("shared")
    print(model)
    serial = solve(model, args.tokens, shared=shared, fixed_chunks=1, **split)
    piped = solve(model, args.tokens, shared=shared, **split)
    for name, s in (("unpipelined (best SM budget)", serial), ("pipelined (solver)", piped)):
        print(f"{name}: {s.predicted_us / 1e3:.3f} ms, {len(s.chunks)} chunks, {s.comm_sms} SMs "
              f"to communication, exposed communication {s.exposed_comm_us() / s.predicted_us:.0%}")
    print(f"predicted speedup {serial.predicted_us / piped.predicted_us:.2f}x")
    print(piped.explain())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
