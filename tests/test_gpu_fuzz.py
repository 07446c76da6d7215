"""Fuzz of the CUDA backend against the whole-world reference: random routings (uneven counts,
empty ranks, -1 entries, skew, one destination rank, repeated experts), K 1..8, odd hidden
sizes, bf16/fp16/fp32 (and an x narrower than the windows), FP8 given or quantized in the
kernel, zero-copy or staged combine, int32 or int64 indices, both schedules.

- test_fuzz_worlds_2_to_8: ranks are processes sharing one GPU (as in test_gpu.py), one spawn
  per world size 2..8, SWIFTEP_FUZZ_CASES cases in each (default 143: 1001 in all; it asserts
  >= 1000 when the full fuzz runs). SWIFTEP_FUZZ_WORLDS="2,8" runs fewer worlds.
- test_emulated_world_kernel_paths: all ranks in one process (Communicator.emulated_world), a
  fixed list of small cases that reaches every kernel and every send path; the compute-sanitizer
  entry point of scripts/gpu_round.sh (with SWIFTEP_LIST_KERNELS=1 it lists the kernels it
  launched, through the torch profiler, and checks that none is missing).
- test_emulated_world_fuzz: SWIFTEP_FUZZ_EMULATED_CASES random cases (default 70) with the
  ranks' kernels running side by side in one process, which processes sharing one GPU never do
  (they take turns).

Every rank draws every case from a seed all ranks share, so it checks its own results against
the reference without communicating. A Communicator is built per shape (the pool of
Shape.draw), not per case: the symmetric-memory rendezvous is the costly part.
"""
import collections
import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
from gpu_world import ENV, GPU_MARKS

import torch_swiftep as ts
from torch_swiftep import testing
from torch_swiftep.launch import WorldError, rank_gpu, run_world

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
WORLDS = (2, 3, 4, 5, 6, 7, 8)
DEFAULT_CASES = 143  # per world: 7 * 143 = 1001 cases, each both schedules
SHAPES_PER_WORLD = 5
MIN_FULL_CASES = 1000


def _gpu(test):
    """The CUDA test files' marks (gpu_world.GPU_MARKS), one test at a time: this file also
    has a CPU test."""
    for mark in GPU_MARKS:
        test = mark(test)
    return test


def _rand(gen, lo: int, hi: int) -> int:
    """An int in [lo, hi], drawn from gen."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _pick(gen, options):
    return options[_rand(gen, 0, len(options) - 1)]


class Shape(NamedTuple):
    """What one Communicator is built for; the cases on it draw the rest."""

    hidden: int
    experts: int
    topk: int
    dtype: torch.dtype  # the windows' dtype; a case's x may be narrower
    max_tokens: int
    num_sms: int
    fanout: bool = False  # CommConfig.dispatch_fanout
    partials: bool = False  # CommConfig.combine_partials

    @staticmethod
    def draw(gen, world: int, max_sms: int = 24) -> "Shape":
        dtype = _pick(gen, (BF16, FP16, FP32))
        if _rand(gen, 0, 1):  # whole 128-channel blocks (FP8 possible), now and then wide
            hidden = 128 * (_rand(gen, 1, 16) if _rand(gen, 0, 7) else _rand(gen, 17, 56))
        else:  # odd sizes: any row of 16 * m bytes that is not whole 128-channel blocks
            unit = 16 // dtype.itemsize
            hidden = unit * _rand(gen, 1, 2048 // unit)
            hidden += unit if hidden % 128 == 0 else 0
        topk = _rand(gen, 1, 8)
        experts = world * _pick(gen, [n for n in (1, 2, 3, 4, 8) if n * world >= topk])
        return Shape(hidden, experts, topk, dtype, 100 if hidden <= 2048 else 32,
                     min(_pick(gen, (1, 2, 3, 5, 8, 24)), max_sms),
                     fanout=world > 1 and _rand(gen, 0, 2) == 0,
                     partials=world > 1 and _rand(gen, 0, 2) == 0)

    def config(self, world: int) -> ts.CommConfig:
        """Windows that hold any case of the shape: "duplicates" repeats slot 0's expert in
        every 3rd token, one row more than distinct experts give (the default capacity's bound)."""
        t, local, extra = self.max_tokens, self.experts // world, math.ceil(self.max_tokens / 3)
        return ts.CommConfig(num_experts=self.experts, hidden=self.hidden, num_topk=self.topk,
                             max_tokens_per_rank=t, dtype=self.dtype,
                             capacity=world * (t * min(self.topk, local) + extra),
                             ll_max_tokens_per_rank=t + extra, num_sms=self.num_sms,
                             timeout_s=60, dispatch_fanout=self.fanout,
                             combine_partials=self.partials)


class Knobs(NamedTuple):
    """A case's choices outside testing.Case."""

    zero_copy: bool
    idx32: bool

    def describe(self, shape: Shape) -> str:
        dtype = str(shape.dtype).replace("torch.", "")
        return (f"[windows {dtype} K={shape.topk} T={shape.max_tokens} sms={shape.num_sms}, "
                f"zero_copy={self.zero_copy}, topk_idx {'int32' if self.idx32 else 'int64'}"
                f"{', dispatch_fanout' if shape.fanout else ''}"
                f"{', combine_partials' if shape.partials else ''}]")


def draw_case(gen, shape: Shape, world: int, seed: int) -> tuple[testing.Case, Knobs]:
    """One random case on shape: K <= the shape's, routing kind, tokens per rank (a fifth of
    the ranks empty), x's dtype (a quarter of the cases narrower than the windows where
    possible), FP8 mode where hidden allows it, zero copy, index dtype."""
    k = shape.topk if _rand(gen, 0, 1) else _rand(gen, 1, shape.topk)
    routing = _pick(gen, testing.ROUTINGS)
    tokens = tuple(0 if _rand(gen, 0, 4) == 0 else _rand(gen, 1, shape.max_tokens)
                   for _ in range(world))
    narrower = {BF16: (FP16,), FP16: (BF16,), FP32: (BF16, FP16)}[shape.dtype]
    x_dtype = _pick(gen, narrower) if _rand(gen, 0, 3) == 0 else shape.dtype
    fp8 = _pick(gen, testing.FP8_MODES) if shape.hidden % 128 == 0 else False
    knobs = Knobs(zero_copy=bool(_rand(gen, 0, 1)), idx32=_rand(gen, 0, 3) == 0)
    case = testing.Case(seed, x_dtype, shape.hidden, k, routing, shape.experts, tokens, fp8)
    if shape.partials and shape.hidden * case.out_dtype.itemsize % 16:  # partials refuse these
        case = testing.Case(seed, shape.dtype, shape.hidden, k, routing, shape.experts, tokens)
    return case, knobs


def expected(case: testing.Case, knobs: Knobs) -> testing.Expected:
    """The case's reference; with knobs.idx32 the ranks' topk_idx are int32 (same routing)."""
    exp = testing.expected(case)
    if knobs.idx32:
        idx = [t.int() for t in exp.inputs.topk_idx]
        exp = dataclasses.replace(exp, inputs=dataclasses.replace(exp.inputs, topk_idx=idx))
    return exp


def layout_errors(comm, rank: int, topk_idx: torch.Tensor) -> list[str]:
    """comm.dispatch_layout of one rank's routing against the CPU op."""
    got = comm.dispatch_layout(topk_idx.to(comm.device))
    want = torch.ops.swiftep.dispatch_layout(topk_idx, comm.config.num_experts, comm.world_size)
    names = ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank")
    return [f"rank {rank}: dispatch_layout {name} differs from the CPU op"
            for name, g, w in zip(names, got, want) if not torch.equal(g.cpu(), w)]


# ------------------------------------------------------------ ranks as processes on one GPU
def _fuzz_ranks(rank, world, num_cases, on_gpu=True):
    """One rank of one world: num_cases random cases, both schedules each. Returns (errors,
    seconds)."""
    if on_gpu:
        device = torch.device("cuda", rank_gpu(rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    gen = torch.Generator().manual_seed(8191 * world)  # the same draws on every rank
    # Under MPS the ranks' kernels run side by side, and each spins until its peers arrive: all
    # ranks' blocks must fit on the GPU at once (as they do with one GPU per rank), else a rank
    # whose kernel cannot start is waited for until timeout_s (measured: 7 ranks x 24 SMs).
    max_sms = torch.cuda.get_device_properties(device).multi_processor_count // world \
        if on_gpu else 24
    shapes = [Shape.draw(gen, world, min(24, max_sms)) for _ in range(SHAPES_PER_WORLD)]
    comms, errors, start = {}, [], time.monotonic()
    for i in range(num_cases):
        shape = _pick(gen, shapes)
        case, knobs = draw_case(gen, shape, world, seed=100_000 * world + i)
        if shape not in comms:  # every rank reaches it at the same case: a collective
            comms[shape] = ts.Communicator(dist.group.WORLD, shape.config(world), device=device)
        where = knobs.describe(shape)
        exp = expected(case, knobs)
        try:
            found = layout_errors(comms[shape], rank, exp.inputs.topk_idx[rank])
            found += testing.run_step(comms[shape], rank, exp, zero_copy=knobs.zero_copy,
                                      device=device)
        except Exception as exc:  # a kernel's report or a crash: name the case, stop the world
            raise RuntimeError(f"rank {rank}, {case} {where}: {type(exc).__name__}: {exc}") \
                from exc
        errors += [f"{where} {e}" if e.startswith("case(") else f"{case} {where}: {e}"
                   for e in found]
    return errors, time.monotonic() - start


def _cases_per_world() -> tuple[int, tuple, bool]:
    """(cases per world, worlds, whether this is the full fuzz) from the environment."""
    cases = int(os.environ.get("SWIFTEP_FUZZ_CASES", DEFAULT_CASES))
    worlds = tuple(int(w) for w in os.environ.get("SWIFTEP_FUZZ_WORLDS", "").split(",") if w)
    worlds = worlds or WORLDS
    return cases, worlds, cases >= DEFAULT_CASES and set(worlds) >= set(WORLDS)


@_gpu
@pytest.mark.slow
def test_fuzz_worlds_2_to_8():
    cases, worlds, full = _cases_per_world()
    total, errors = 0, []
    for world in worlds:
        start = time.monotonic()
        try:
            results = run_world(world, _fuzz_ranks, cases, env=ENV, timeout_s=120 + 3 * cases)
        except WorldError as exc:  # a crash or a timeout: report it, go on with the next world
            errors.append(f"world {world}: {exc}")
            print(f"fuzz: world {world}: FAILED after {time.monotonic() - start:.0f} s",
                  flush=True)
            continue
        found = [e for per_rank, _ in results for e in per_rank]
        errors += found
        total += cases
        print(f"fuzz: world {world}: {cases} cases ({2 * cases} steps) in "
              f"{max(s for _, s in results):.1f} s of cases, {time.monotonic() - start:.1f} s "
              f"with the spawn; {len(found)} mismatches", flush=True)
    print(f"fuzz: {total} cases in total over worlds {list(worlds)}", flush=True)
    assert not errors, f"{len(errors)} errors:\n" + "\n".join(errors[:20])
    if full:
        assert total >= MIN_FULL_CASES, total


@pytest.mark.slow
def test_fuzz_cases_on_cpu_backend():
    """The generator itself, on the CPU backend (a few cases): a bad draw fails here, not on
    the GPU."""
    results = run_world(3, _fuzz_ranks, 4, False, timeout_s=300)
    errors = [e for per_rank, _ in results for e in per_rank]
    assert not errors, "\n".join(errors[:20])


# ---------------------------------------------------------------- all ranks in one process
def _emulated_step(comms, streams, exp, knobs, low_latency: bool) -> list[str]:
    """Every rank's dispatch, fake expert and combine on its own stream, side by side, then
    every rank's results against the reference."""
    from torch_swiftep.bench.timing import fork_join

    inputs = [exp.rank_inputs(r, comms[r].device) for r in range(len(comms))]
    out_dtype = exp.case.out_dtype

    def dispatch(r):
        comm, (x, idx, w, scales) = comms[r], inputs[r]
        call = comm.low_latency_dispatch if low_latency else comm.dispatch
        return call(x, idx, w, x_scales=scales, quantize_fp8=exp.case.fused)

    def experts(r):
        out = testing.expert_output(handles[r], out_dtype)
        if knobs.zero_copy:
            comm = comms[r]
            window = comm.low_latency_combine_buffer if low_latency else comm.combine_buffer
            out = window(out_dtype).copy_(out)
        return out

    def combine(r):
        call = comms[r].low_latency_combine if low_latency else comms[r].combine
        return call(outs[r], handles[r])

    # Phase by phase, every rank's call issued before the next phase's: between two ranks'
    # issues of calls that wait for each other the host must not block (a first use of a torch
    # kernel, or an allocation, can synchronize the context under a sanitizer or MPS; the
    # spinning rank would then wait for a rank whose call was never issued).
    ranks = range(len(comms))
    handles = fork_join([functools.partial(dispatch, r) for r in ranks], streams)
    outs = fork_join([functools.partial(experts, r) for r in ranks], streams)
    ys = fork_join([functools.partial(combine, r) for r in ranks], streams)
    pairs = list(zip(handles, ys))
    torch.cuda.synchronize()
    errors = []
    for r, comm in enumerate(comms):
        comm.check()
        errors += testing.check_step(r, exp, *pairs[r])
    return errors


def _emulated_case(world_comms, shape, case, knobs) -> list[str]:
    """Both schedules and dispatch_layout of one case in an emulated world of case.world ranks
    (built once per (world, shape) in world_comms)."""
    world, where = case.world, knobs.describe(shape)
    if (world, shape) not in world_comms:
        comms = ts.Communicator.emulated_world(shape.config(world), world, torch.device("cuda"))
        streams = [torch.cuda.Stream() for _ in range(world)]
        for s in streams:  # a cached block per stream, so no rank's first call allocates a
            with torch.cuda.stream(s):  # segment (which may synchronize) while another spins
                torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
        world_comms[(world, shape)] = comms, streams
    comms, streams = world_comms[(world, shape)]
    exp = expected(case, knobs)
    errors = []
    try:
        for r, comm in enumerate(comms):
            errors += layout_errors(comm, r, exp.inputs.topk_idx[r])
        for low_latency in (False, True):
            errors += _emulated_step(comms, streams, exp, knobs, low_latency)
    except Exception as exc:
        raise RuntimeError(f"{case} {where}: {type(exc).__name__}: {exc}") from exc
    return [f"{case} {where}: {e}" for e in errors]


# x dtype, windows' dtype, hidden, K, experts, routing, fp8, tokens per rank (the world size
# is their number), SMs, zero copy, int32 indices, dispatch_fanout, combine_partials. What each
# reaches besides
# the counts and data kernels and dispatch_layout:
COVERAGE = (
    # FP8 x with scales through both staged sends; pairs of a small call (16 tokens < 24
    # warps); the staging copy (copy_rows) before the low-latency combine; int32 indices;
    # combine_partials from the experts' own tensor
    (BF16, BF16, 256, 2, 8, "holes", True, (16, 5), 3, False, True, False, True),
    # 264-byte x rows in 528-byte windows: the plain (no bulk copy) sends and combine reads;
    # an empty rank; an expert twice in a token
    (BF16, FP32, 132, 3, 4, "duplicates", False, (9, 0), 2, True, False, False, False),
    # quantize_fp8=True: the staged quantizer (throughput), whole tokens of the direct FP8
    # kernel (20 tokens >= 8 warps); fp16 x, bf16 combine; dispatch_fanout's whole-token sends
    # (20 tokens >= 16 warps) and its two kernels; with combine_partials, int64 indices
    (FP16, FP16, 384, 4, 6, "skewed", "fused", (20, 0, 7), 1, False, False, True, True),
    # fp32 end to end, K=1, whole-token units of the staged low-latency send
    (FP32, FP32, 68, 1, 2, "one_rank", False, (12, 12), 1, True, True, False, False),
    # fp16 combine; K=8; small call with each pair's 1040-byte row in 3 chunks
    (FP16, FP16, 520, 8, 16, "uniform", False, (3, 1), 8, False, False, False, False),
    # the direct FP8 kernel's row chunks (2 tokens, 64 warps), zero copy
    (BF16, BF16, 1024, 2, 8, "uniform", "fused", (2, 2), 8, True, True, False, False),
)
# Kernels (and instantiations) the COVERAGE cases must launch: substrings of the names. The
# staged combine_kernel serves the low-latency window, combine_ldg_kernel the throughput window
# (a build with -DSWIFTEP_COMBINE_LDG=0, for A/B runs only, has no combine_ldg_kernel).
REQUIRED_KERNELS = (
    ("dispatch_layout_kernel",), ("dispatch_counts_kernel",), ("dispatch_data_kernel",),
    ("ll_dispatch_kernel", "false"), ("ll_dispatch_kernel", "true"), ("copy_rows_tma_kernel",),
    ("combine_kernel<__nv_bfloat16",), ("combine_kernel<__half",), ("combine_kernel<float",),
    ("combine_ldg_kernel<__nv_bfloat16",), ("combine_ldg_kernel<__half",),
    ("combine_ldg_kernel<float",), ("fanout_lowest_kernel",), ("fanout_copy_kernel",),
    ("combine_push_kernel<__nv_bfloat16",),
    ("combine_partials_reduce_kernel<__nv_bfloat16, int>",),
    ("combine_partials_reduce_kernel<__nv_bfloat16, long>",),
    ("swiglu_rows_kernel<__nv_bfloat16, 8>",), ("swiglu_rows_kernel<__nv_bfloat16, 1>",),
)


@contextlib.contextmanager
def _kernel_names(names: collections.Counter):
    """Counts the swiftep kernels launched inside the block (torch profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
    for event in prof.events():
        if "swiftep::" in event.name and "_kernel" in event.name:
            names[event.name] += 1


def _swiglu_rows_case() -> list:
    """The experts' SwiGLU (not a communication kernel, but in the library): vectorized and
    element-wise rows, a count inside the tensor, against torch's expression."""
    errors = []
    for width in (64, 13):
        gate_up = torch.randn(50, 2 * width, device="cuda").bfloat16()
        out = ts.swiglu_rows(gate_up, torch.tensor([9, 33], dtype=torch.int32, device="cuda"))
        want = torch.nn.functional.silu(gate_up[:33, :width]) * gate_up[:33, width:]
        if not torch.equal(out[:33], want):
            errors.append(f"swiglu_rows width {width}: differs from F.silu(gate) * up")
    return errors


@_gpu
def test_emulated_world_kernel_paths():
    names = collections.Counter()
    listing = bool(os.environ.get("SWIFTEP_LIST_KERNELS"))
    world_comms, errors = {}, []
    with _kernel_names(names) if listing else contextlib.nullcontext():
        for seed, (x_dtype, dtype, hidden, k, experts, routing, fp8, tokens, sms, zero_copy,
                   idx32, fanout, partials) in enumerate(COVERAGE, start=31):
            shape = Shape(hidden, experts, k, dtype, max(tokens), sms, fanout, partials)
            case = testing.Case(seed, x_dtype, hidden, k, routing, experts, tokens, fp8)
            errors += _emulated_case(world_comms, shape, case, Knobs(zero_copy, idx32))
        errors += _swiglu_rows_case()
    if listing:
        for name, count in sorted(names.items()):
            print(f"kernel: {count:4d} x {name}")
        missing = [" ".join(parts) for parts in REQUIRED_KERNELS
                   if not any(all(p in n for p in parts) for n in names)]
        print(f"kernels: {len(names)} distinct, missing: {missing or 'none'}")
        assert not missing, f"kernels not launched: {missing}"
    assert not errors, "\n".join(errors[:20])


@_gpu
def test_emulated_world_fuzz():
    """SWIFTEP_FUZZ_EMULATED_CASES random cases (default 70) over worlds 2..8, all ranks in
    one process: their kernels run side by side (SM budgets that fit the GPU together)."""
    cases = int(os.environ.get("SWIFTEP_FUZZ_EMULATED_CASES", 70))
    errors, start = [], time.monotonic()
    for world in WORLDS:
        gen = torch.Generator().manual_seed(524287 * world)
        max_sms = torch.cuda.get_device_properties(0).multi_processor_count * 3 // 4 // world
        shapes = [Shape.draw(gen, world, max_sms) for _ in range(3)]
        world_comms = {}
        for i in range(world - 2, cases, len(WORLDS)):
            shape = _pick(gen, shapes)
            case, knobs = draw_case(gen, shape, world, seed=7_000_000 + i)
            errors += _emulated_case(world_comms, shape, case, knobs)
        del world_comms
        torch.cuda.empty_cache()
    print(f"fuzz: emulated worlds: {cases} cases in {time.monotonic() - start:.1f} s")
    assert not errors, f"{len(errors)} errors:\n" + "\n".join(errors[:20])
