"""Every bad input and fault the tests try, as data: what it is, the exception class every
backend raises, the pattern its message must match, and how to provoke it.

tests/test_bad_inputs.py runs the single-process faults (`single_rank_faults()`), and
tests/test_failures.py asserts the multi-rank ones (`MULTI_RANK_FAULTS`) with these patterns.
docs/reliability.md is rendered from this module with the messages the faults really produce,
so the table cannot drift from the tests:

    python3 tests/fault_catalogue.py --write      # regenerate docs/reliability.md
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import time
from typing import Callable

import torch

import torch_swiftep as ts

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
E, H, K, T = 8, 64, 2, 16


@dataclasses.dataclass(frozen=True)
class Fault:
    what: str  # the bad input or fault, in words
    expect: type  # the exception class every backend raises
    pattern: str  # regex the message matches
    run: Callable[[], object] = None  # provokes it in this process (None: multi-rank)
    where: str = "CPU"  # where the tests provoke it


def caught(fn) -> tuple[str, str, float]:
    """(exception class, message, seconds) of fn(), or ("", "", seconds) when it returns: how
    the multi-rank tests observe a fault on each rank."""
    t0 = time.monotonic()
    try:
        fn()
    except Exception as exc:
        return type(exc).__name__, str(exc), time.monotonic() - t0
    return "", "", time.monotonic() - t0


def comm(**overrides) -> ts.Communicator:
    fields = dict(num_experts=E, hidden=H, num_topk=K, max_tokens_per_rank=T,
                  ll_max_tokens_per_rank=T)
    return ts.Communicator(None, ts.CommConfig(**{**fields, **overrides}))


def inputs(n=6, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, H, generator=gen).to(dtype)
    idx = torch.rand(n, E, generator=gen).topk(K, dim=1).indices
    w = torch.rand(n, K, generator=gen)
    return x, idx, w


def _dispatch_faults(method: str) -> list[Fault]:
    """Bad (x, topk_idx, topk_weights) of one dispatch schedule."""
    def case(what, mutate, exc, pattern):
        return Fault(f"{method}: {what}", exc, pattern,
                     lambda: getattr(comm(), method)(*mutate(*inputs())))
    row = torch.tensor([0])
    return [
        case("x of an integer dtype", lambda x, i, w: (x.to(torch.int32), i, w), TypeError,
             r"x must have dtype in .*torch.int32"),
        case("x of another hidden size", lambda x, i, w: (x[:, :32].contiguous(), i, w),
             ValueError, r"x has hidden=32"),
        case("x with 3 dimensions", lambda x, i, w: (x.unsqueeze(0), i, w), ValueError,
             r"x must have 2 dimensions"),
        case("x not contiguous", lambda x, i, w: (x.t().contiguous().t(), i, w), ValueError,
             r"x must be contiguous"),
        case("x on another device", lambda x, i, w: (x.to("meta"), i, w), ValueError,
             r"x is on meta"),
        case("topk_idx of a float dtype", lambda x, i, w: (x, i.float(), w), TypeError,
             r"topk_idx must have dtype"),
        case("topk_idx with fewer tokens than x", lambda x, i, w: (x, i[:5], w[:5]), ValueError,
             r"topk_idx has 5 tokens but x has 6"),
        case("topk_weights of another shape", lambda x, i, w: (x, i, w[:, :1].contiguous()),
             ValueError, r"topk_weights.shape=\(6, 1\)"),
        case("topk_weights in float64", lambda x, i, w: (x, i, w.double()), TypeError,
             r"topk_weights must have dtype"),
        case("topk_idx not contiguous", lambda x, i, w: (x, i.t().contiguous().t(), w),
             ValueError, r"topk_idx must be contiguous"),
        case("more top-k slots than configured",
             lambda x, i, w: (x, torch.full((6, 3), 1), torch.ones(6, 3)), ValueError,
             r"num_topk=3, more than the communicator's num_topk=2"),
        case("topk_idx entry = num_experts", lambda x, i, w: (x, i.index_fill(1, row, E), w),
             ts.SwiftepIndexError, r"topk_idx\[0, 0\] = 8 is out of range"),
        case("topk_idx entry = -2", lambda x, i, w: (x, i.index_fill(1, row + 1, -2), w),
             ts.SwiftepIndexError, r"topk_idx\[0, 1\] = -2 is out of range"),
        case("more tokens than max_tokens_per_rank",
             lambda x, i, w: (torch.randn(T + 1, H).bfloat16(),
                              torch.zeros(T + 1, K, dtype=torch.long), torch.ones(T + 1, K)),
             ValueError, r"x has 17 tokens, more than"),
    ]


def _combine_faults() -> list[Fault]:
    def case(what, exc, pattern, fn):
        def run():
            c = comm()
            x, idx, w = inputs()
            return fn(c, c.dispatch(x, idx, w), w)
        return Fault(f"combine: {what}", exc, pattern, run)
    return [
        case("expert_out of another hidden size", ValueError, r"expert_out has hidden=32",
             lambda c, h, w: c.combine(c.combine_buffer()[:, :32].contiguous(), h)),
        case("expert_out with fewer rows than the window", ValueError, r"expert_out has 3 rows",
             lambda c, h, w: c.combine(c.combine_buffer()[:3], h)),
        case("a handle whose token_rows were cut", ValueError, r"token_rows.shape=\(5, 2\)",
             lambda c, h, w: c.combine(c.combine_buffer(),
                                       h._replace(token_rows=h.token_rows[:5]))),
        case("topk_weights in float64", TypeError, r"topk_weights must have dtype",
             lambda c, h, w: c.combine(c.combine_buffer(), h, topk_weights=w.double())),
        case("a handle from another Communicator", ValueError,
             r"the handle comes from another Communicator",
             lambda c, h, w: comm().combine(c.combine_buffer(), h)),
        case("a stale handle (a newer dispatch overwrote the windows)", ValueError,
             r"stale handle: it comes from call 1 \(dispatch\), but the dispatch of call 2",
             lambda c, h, w: (c.dispatch(*inputs()), c.combine(c.combine_buffer(), h))),
        case("a stale low-latency handle", ValueError, r"stale handle.*low_latency_dispatch",
             lambda c, h, w: (lambda old: (c.low_latency_dispatch(*inputs()),
                                           c.low_latency_combine(c.low_latency_combine_buffer(),
                                                                 old)))(
                 c.low_latency_dispatch(*inputs()))),
        case("low-latency expert_out of the throughput shape", ValueError,
             r"expert_out must have 3 dimensions, got shape \(32, 64\)",
             lambda c, h, w: c.low_latency_combine(c.combine_buffer(),
                                                   c.low_latency_dispatch(*inputs()))),
        case("low-latency expert_out with fewer rows than the window", ValueError,
             r"the low-latency window is \(8, 16, 64\)",
             lambda c, h, w: c.low_latency_combine(c.low_latency_combine_buffer()[:, :4].clone(),
                                                   c.low_latency_dispatch(*inputs()))),
    ]


def _config_faults() -> list[Fault]:
    def case(what, pattern, **kwargs):
        fields = dict(num_experts=E, hidden=H, num_topk=K, max_tokens_per_rank=T)
        return Fault(f"CommConfig: {what}", ValueError, pattern,
                     lambda: ts.CommConfig(**{**fields, **kwargs}))
    return [
        case("num_topk > num_experts", r"num_topk=9 is larger than num_experts=8", num_topk=9),
        case("max_tokens_per_rank = 0", r"max_tokens_per_rank must be a positive int, got 0",
             max_tokens_per_rank=0),
        case("rows not a multiple of 16 bytes", r"hidden=3 gives rows of 6 bytes", hidden=3),
        case("an int8 dtype", r"dtype must be one of", dtype=torch.int8),
        case("timeout_s = 0", r"timeout_s must be > 0, got 0", timeout_s=0),
        case("capacity = 0", r"capacity must be a positive int, got 0", capacity=0),
        case("ll_max_tokens_per_rank < 0", r"ll_max_tokens_per_rank must be >= 0",
             ll_max_tokens_per_rank=-1),
        case("num_sms = 0", r"num_sms must be a positive int, got 0", num_sms=0),
        case("dispatch_fanout not a bool", r"dispatch_fanout must be a bool, got 1",
             dispatch_fanout=1),
        case("combine_partials not a bool", r"combine_partials must be a bool, got 1",
             combine_partials=1),
        Fault("Plan: combine_partials across nodes", ValueError,
              r"combine_partials=True needs one node, got ranks_per_node=2 < world_size=4",
              lambda: ts.Plan.build(ts.CommConfig(num_experts=8, hidden=H, num_topk=K,
                                                  max_tokens_per_rank=T, ranks_per_node=2,
                                                  combine_partials=True), 0, 4)),
        Fault("Plan: num_experts not divisible by the world size", ValueError,
              r"num_experts=6 is not divisible by world_size=4",
              lambda: ts.Plan.build(ts.CommConfig(num_experts=6, hidden=H, num_topk=K,
                                                  max_tokens_per_rank=T), 0, 4)),
    ]


def _other_faults() -> list[Fault]:
    x, idx, w = inputs()
    fp8_128 = ts.quantize_fp8(torch.randn(6, 128))[0]
    no_ll = dict(ll_max_tokens_per_rank=0)
    return [
        Fault("dispatch: FP8 x without x_scales", ValueError, r"x_scales .* is required",
              lambda: comm().dispatch(x.to(torch.float8_e4m3fn), idx, w)),
        Fault("dispatch: x_scales with a bf16 x", ValueError,
              r"x_scales is given but x has dtype torch.bfloat16",
              lambda: comm().dispatch(x, idx, w, x_scales=torch.ones(6, 1))),
        Fault("dispatch: x_scales of the wrong shape", ValueError,
              r"x_scales.shape=\(6, 2\) must be \(6, 1\)",
              lambda: comm(hidden=128).dispatch(fp8_128, idx, w, x_scales=torch.ones(6, 2))),
        Fault("dispatch: quantize_fp8 with x_scales", ValueError, r"quantize_fp8=True makes the "
              "scales", lambda: comm(hidden=128).dispatch(torch.randn(6, 128).bfloat16(), idx, w,
                                                          x_scales=torch.ones(6, 1),
                                                          quantize_fp8=True)),
        Fault("dispatch: quantize_fp8 not a bool", TypeError, r"quantize_fp8 must be a bool",
              lambda: comm().dispatch(x, idx, w, quantize_fp8=1)),
        Fault("dispatch: num_sms = 0 for one call", ValueError,
              r"num_sms must be a positive int, got 0", lambda: comm().dispatch(x, idx, w,
                                                                             num_sms=0)),
        Fault("dispatch: routing overflows the configured capacity", ts.SwiftepError,
              r"capacity overflow: rank 0 receives 12 rows, more than capacity=5",
              lambda: comm(capacity=5).dispatch(x, idx, w)),
        Fault("combine_partials: combine with other weights than dispatch's", ValueError,
              r"topk_weights: combine_partials=True combines with the weights dispatch sent",
              lambda: (lambda c: (lambda h: c.combine(c.combine_buffer(), h,
                                                      topk_weights=w.clone()))(
                  c.dispatch(x, idx, w)))(comm(combine_partials=True))),
        Fault("low_latency_dispatch without low-latency windows", ValueError,
              r"no low-latency windows", lambda: comm(**no_ll).low_latency_dispatch(x, idx, w)),
        Fault("low_latency_combine_buffer without low-latency windows", ValueError,
              r"no low-latency windows", lambda: comm(**no_ll).low_latency_combine_buffer()),
        Fault("torch.ops.swiftep.dispatch called directly with an out-of-range index",
              IndexError, r"topk_idx\[2, 1\] = 99",
              lambda: (lambda c, i: torch.ops.swiftep.dispatch(
                  x, None, i, w, c.workspace, c.peer_ptrs, "", c.plan.as_list(), 4))(
                  comm(), idx.index_put((torch.tensor([2]), torch.tensor([1])),
                                        torch.tensor(99)))),
        Fault("dispatch_layout: topk_idx of 1 dimension", ValueError,
              r"topk_idx must have 2 dimensions, got shape \(12,\)",
              lambda: comm().dispatch_layout(idx.flatten())),
        Fault("dispatch_layout: topk_idx of a float dtype", TypeError,
              r"topk_idx must have dtype in", lambda: comm().dispatch_layout(idx.float())),
        Fault("start() with another Communicator's method", ValueError,
              r"start\(\) takes a method of this Communicator",
              lambda: comm().start(comm().dispatch, x, idx, w)),
        Fault("combine: symmetric not a bool", TypeError, r"symmetric must be a bool, got 1",
              lambda: (lambda c: c.combine(c.combine_buffer(), c.dispatch(x, idx, w),
                                           symmetric=1))(comm())),
        Fault("torch.ops.swiftep.combine_symmetric with a segment_offset not a multiple of 16",
              ValueError, r"segment_offset must be a non-negative multiple of 16, got 8",
              lambda: _combine_symmetric_op(x, idx, w, segment=0, offset=8)),
        Fault("torch.ops.swiftep.combine_symmetric with a segment past its segment table",
              ValueError, r"segment must be -1 or in \[0, 2\) \(segment_bases' rows\), got 2",
              lambda: _combine_symmetric_op(x, idx, w, segment=2, offset=0)),
    ]


def _dispatched(x, idx, w):
    c = comm()
    return c, c.dispatch(x, idx, w)


def _combine_symmetric_op(x, idx, w, segment: int, offset: int):
    """The op called directly, with a 2-segment table and the given (segment, offset)."""
    c, h = _dispatched(x, idx, w)
    return torch.ops.swiftep.combine_symmetric(
        c.combine_buffer(), torch.zeros(2, 1, dtype=torch.int64), segment, offset, h.topk_idx,
        h.topk_weights, h.token_rows, h.expert_offsets, c.workspace, c.peer_ptrs, "",
        c.plan.as_list(), 4)


def single_rank_faults() -> list[Fault]:
    return (_dispatch_faults("dispatch") + _dispatch_faults("low_latency_dispatch")
            + _combine_faults() + _config_faults() + _other_faults())


# Asserted by tests/test_failures.py (CPU backend, ranks as processes over gloo).
MULTI_RANK_FAULTS = [
    Fault("ranks build Communicators with different hidden sizes", ValueError,
          r"hidden differs \(rank 0: 32; rank 1: 64\)", where="CPU (gloo, 2 ranks)"),
    Fault("one rank's topk_idx out of range, the other's fine: the bad rank", ts.SwiftepIndexError,
          r"topk_idx\[2, 1\] = 13 is out of range", where="CPU (gloo, 2 ranks)"),
    Fault("... the good rank (at once, not after timeout_s)", ts.SwiftepError,
          r"dispatch call 1: rank 1 rejected its inputs \(SwiftepIndexError",
          where="CPU (gloo, 2 ranks)"),
    Fault("a rank alive but not calling, timeout_s=1.5: the waiting rank",
          ts.BrokenCommunicatorError,
          r"rank 1 never arrived at dispatch call 1 within timeout_s=1.5",
          where="CPU (gloo, 2 ranks)"),
    Fault("... the late rank, when it calls", ts.BrokenCommunicatorError,
          r"rank 0 gave up waiting", where="CPU (gloo, 2 ranks)"),
    Fault("... any later call on the broken communicator", ts.BrokenCommunicatorError,
          r"this communicator is broken .* build a new one", where="CPU (gloo, 2 ranks)"),
    Fault("a rank killed (SIGKILL) between calls, timeout_s=2: the survivors",
          ts.BrokenCommunicatorError, r"rank 2 never arrived at dispatch call 3",
          where="CPU (gloo, 3 ranks)"),
    Fault("a rank across a node boundary alive but not calling (2 nodes of 2, timeout_s=1.5): "
          "the waiting ranks, on both nodes", ts.BrokenCommunicatorError,
          r"rank 3 \(node 1\) never arrived at dispatch call 1 within timeout_s=1.5",
          where="CPU (gloo, 4 ranks, ranks_per_node=2)"),
]


# Asserted by tests/test_gpu_failures.py (CUDA backend, ranks as processes sharing one GPU).
_GPU = "CUDA (2 processes, one GPU)"
_GPU3 = "CUDA (3 processes, one GPU)"
GPU_MULTI_RANK_FAULTS = {
    "config": Fault("ranks build Communicators with different hidden sizes", ValueError,
                    r"hidden differs \(rank 0: 256; rank 1: 512\)", where=_GPU),
    "rejected": Fault("one rank's x of another hidden size: the bad rank", ValueError,
                      r"x has hidden=128", where=_GPU),
    "peer_waited": Fault(
        "... the other rank, whose kernel was waiting for it (at once, not after timeout_s)",
        ts.BrokenCommunicatorError,
        r"rank 1 failed a call, so this rank's dispatch counts wait \(call 1\) gave up at once; "
        r".*rank 1 rejected its inputs for dispatch call 1 \(ValueError: x has hidden=128",
        where=_GPU),
    "later": Fault("... any later call, on either rank", ts.BrokenCommunicatorError,
                   r"this communicator is broken .* build a new one", where=_GPU),
    "killed": Fault("a rank killed (SIGKILL) between calls, timeout_s=2: the survivors (then "
                    "they rebuild over the ranks that remain)",
                    ts.BrokenCommunicatorError,
                    r"timed out waiting for rank 2 \(dispatch .*must be rebuilt",
                    where=_GPU3),
}


def _observed(fault: Fault) -> str:
    try:
        fault.run()
    except Exception as exc:  # the table shows what the user sees
        # communicator ids and object addresses vary from run to run: not part of the text
        text = re.sub(r"0x[0-9a-f]+", "0x...", str(exc).splitlines()[0])
        return f"`{type(exc).__name__}`: {re.sub(r'#[0-9]+', '#N', text)}"
    return "**no error**"


def render() -> str:
    lines = ["# Reliability: every bad input and fault the tests try", "",
             "Generated by `python3 tests/fault_catalogue.py --write` from the catalogue the tests",
             "run (tests/test_bad_inputs.py, tests/test_failures.py, tests/test_gpu_failures.py);",
             "a test fails while it is stale. Single-process rows show the message the fault",
             "really produces; multi-rank rows show the pattern the tests assert. Argument checks",
             "are the ops' contracts (ops/), run by the Python wrapper before either backend, so",
             "CUDA gets the same class and text; out-of-range indices and capacity overflow are",
             "found by the CUDA kernels and raised at the next call or `check()`, with the same",
             "classes. A rank that rejects its inputs on CUDA writes its rank into every peer's",
             "control region, so the peers' kernels give up at once and name it; after that, or",
             "after a timeout, the ranks' call counters disagree and the communicator must be",
             "rebuilt.", "",
             "| # | bad input or fault | tested on | error |", "|---|---|---|---|"]
    rows = [(f.what, f.where, _observed(f)) for f in single_rank_faults()]
    rows += [(f.what, f.where, f"`{f.expect.__name__}` matching `{f.pattern}`")
             for f in MULTI_RANK_FAULTS + list(GPU_MULTI_RANK_FAULTS.values())]
    for i, (what, where, error) in enumerate(rows, start=1):
        lines.append(f"| {i} | {what} | {where} | {error.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if "--write" in sys.argv:
        DOC.write_text(render())
        print(f"wrote {DOC}")
    else:
        print(render())
