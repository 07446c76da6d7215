"""The test recipe shared by the tests, the GPU round and the benchmarks, written once.

Every rank builds every rank's inputs from one seed, so a rank compares its own results with
the whole-world reference without any extra communication:

    case = testing.Case(seed=1, dtype=torch.bfloat16, hidden=256, topk=2, routing="holes",
                        experts=8, tokens=(5, 0, 17))
    exp = testing.expected(case)             # every rank's inputs and reference outputs
    comm = Communicator(group, case.config())
    errors = testing.run_step(comm, rank, exp, zero_copy=True)   # [] when everything matches

A step dispatches the rank's tokens, runs the fake expert on the received rows and combines;
dispatch must match the reference bit for bit, combine within `close`'s tolerance. Across nodes
(`expected(case, ranks_per_node=P)`, P < world, for a CPU world of CommConfig(ranks_per_node=P))
the throughput combine must match the reference's node order bit for bit too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from . import CommConfig, LowLatencyDispatchResult, quantize_fp8, reference

ROUTINGS = ("uniform", "skewed", "holes", "one_rank", "duplicates")
SCHEDULES = ("throughput", "low_latency")
FP8_MODES = (False, True, "fused")


def random_routing(gen: torch.Generator, num_tokens: int, num_experts: int, num_topk: int,
                   kind: str, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx [N, K] int64, topk_weights [N, K] float32) of one rank.

    uniform: K distinct experts per token, uniformly drawn.
    skewed: every token's slot 0 is expert 0 (all tokens to one expert), other slots uniform.
    holes: uniform, then a quarter of the entries (and every 7th token entirely) set to -1.
    duplicates: uniform, then every 3rd token names its slot-0 expert again in its last slot
        (the contract: each slot is its own row, and combine adds both, each with its weight).
    one_rank: every expert of every token lives on the last rank.
    """
    if kind not in ROUTINGS:
        raise ValueError(f"routing kind must be one of {ROUTINGS}, got {kind!r}")
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if kind == "one_rank":
        local = num_experts // world_size
        scores[:, : num_experts - local] = -1.0
    if kind == "skewed":
        scores[:, 0] = 2.0  # expert 0 wins slot 0 for every token
    idx = scores.topk(num_topk, dim=1).indices
    weights = torch.rand(num_tokens, num_topk, generator=gen) + 0.1
    if kind == "holes":
        holes = torch.rand(num_tokens, num_topk, generator=gen) < 0.25
        holes[::7] = True
        idx = idx.masked_fill(holes, -1)
    if kind == "duplicates" and num_topk > 1:
        idx[::3, -1] = idx[::3, 0]
    return idx.contiguous(), weights.float().contiguous()


@dataclass
class WorldInputs:
    xs: list
    x_scales: Optional[list]
    topk_idx: list
    topk_weights: list


def world_inputs(seed: int, tokens_per_rank: Sequence[int], hidden: int, num_experts: int,
                 num_topk: int, dtype: torch.dtype, routing: str = "uniform",
                 fp8: bool = False) -> WorldInputs:
    """Every rank's inputs, identical on every rank (drawn on the CPU from one seed)."""
    gen = torch.Generator().manual_seed(seed)
    world = len(tokens_per_rank)
    xs, scales, idxs, ws = [], [], [], []
    for n in tokens_per_rank:
        x = torch.randn(n, hidden, generator=gen).to(dtype)
        idx, w = random_routing(gen, n, num_experts, num_topk, routing, world)
        if fp8:
            x, s = quantize_fp8(x)
            scales.append(s)
        xs.append(x)
        idxs.append(idx)
        ws.append(w)
    return WorldInputs(xs, scales if fp8 else None, idxs, ws)


@dataclass(frozen=True)
class Case:
    """One world's configuration; its inputs are drawn from seed.

    fp8: False (x in dtype), True (x given in FP8 with its scales) or "fused" (x in dtype,
    dispatch quantizes: quantize_fp8=True). tokens: per rank; the world size is len(tokens).
    """

    seed: int
    dtype: torch.dtype
    hidden: int
    topk: int
    routing: str
    experts: int
    tokens: tuple
    fp8: Union[bool, str] = False

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.fp8 not in FP8_MODES or self.routing not in ROUTINGS:
            raise ValueError(f"fp8 must be one of {FP8_MODES} and routing one of {ROUTINGS}: "
                             f"{self}")

    @property
    def world(self) -> int:
        return len(self.tokens)

    @property
    def fused(self) -> bool:
        return self.fp8 == "fused"

    @property
    def out_dtype(self) -> torch.dtype:
        """The fake expert's output dtype: bf16 after an FP8 dispatch, else x's dtype."""
        return torch.bfloat16 if self.fp8 else self.dtype

    def inputs(self) -> WorldInputs:
        """Every rank's inputs (world_inputs of the case)."""
        return world_inputs(self.seed, self.tokens, self.hidden, self.experts, self.topk,
                            self.dtype, self.routing, fp8=self.fp8 is True)

    def config(self, **overrides) -> CommConfig:
        """A CommConfig that fits the case (both schedules' windows hold max(tokens))."""
        most = max(max(self.tokens), 1)
        kwargs = dict(num_experts=self.experts, hidden=self.hidden, num_topk=self.topk,
                      max_tokens_per_rank=most, dtype=self.dtype, ll_max_tokens_per_rank=most)
        return CommConfig(**{**kwargs, **overrides})

    def __str__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return (f"case(seed={self.seed}, {dtype}, hidden={self.hidden}, topk={self.topk}, "
                f"{self.routing}, experts={self.experts}, fp8={self.fp8}, "
                f"tokens={list(self.tokens)})")


@dataclass
class Expected:
    """A case's world inputs and every rank's reference outputs (pure torch, on the CPU).

    sent_xs / sent_scales: the bytes dispatch moves (x as given, or x quantized by the torch
    recipe, which the quantizing kernels must reproduce exactly). y: per rank, the reference
    combine of the fake expert's outputs, the target of both schedules' combine within `close`.
    y_nodes: per rank, the reference combine across nodes (expected's ranks_per_node), which
    replaces y for the throughput schedule, bit for bit; None on one node."""

    case: Case
    inputs: WorldInputs
    sent_xs: list
    sent_scales: Optional[list]
    dispatch: list  # per rank: reference.RefDispatch
    token_rows: list  # per rank: [N, K] int32
    y: list
    y_nodes: Optional[list] = None
    _low_latency: dict = field(default_factory=dict, repr=False)

    def low_latency(self, ll_tokens: int) -> tuple[list, list]:
        """(per rank RefLowLatencyDispatch, per rank token_rows) for windows of ll_tokens
        tokens per rank (CommConfig.ll_max_tokens_per_rank)."""
        if ll_tokens not in self._low_latency:
            inp = self.inputs
            self._low_latency[ll_tokens] = reference.low_latency_dispatch(
                self.sent_xs, inp.topk_idx, inp.topk_weights, self.case.experts, ll_tokens,
                self.sent_scales)
        return self._low_latency[ll_tokens]

    def rank_inputs(self, rank: int, device=None) -> tuple:
        """(x, topk_idx, topk_weights, x_scales or None) of one rank, on device."""
        inp = self.inputs
        scales = inp.x_scales[rank] if self.case.fp8 is True else None
        tensors = (inp.xs[rank], inp.topk_idx[rank], inp.topk_weights[rank], scales)
        return tuple(t.to(device) if t is not None and device is not None else t
                     for t in tensors)


def expected(case: Case, ranks_per_node: Optional[int] = None) -> Expected:
    """The case's inputs, the reference dispatch and the reference combine of the fake
    expert's outputs (the low-latency reference comes on demand: Expected.low_latency).
    ranks_per_node: the nodes the throughput combine runs across (CPU backend; the
    low-latency schedule stays flat), which also gives Expected.y_nodes when < world."""
    inp = case.inputs()
    sent_xs, sent_scales = inp.xs, inp.x_scales
    if case.fused:
        quantized = [quantize_fp8(x) for x in inp.xs]
        sent_xs, sent_scales = [q for q, _ in quantized], [s for _, s in quantized]
    ref, rows = reference.dispatch(sent_xs, inp.topk_idx, inp.topk_weights, case.experts,
                                   sent_scales)
    outs = [fake_expert(r.recv_x, r.expert_offsets, case.out_dtype, r.recv_scales) for r in ref]
    y = reference.combine(outs, inp.topk_idx, inp.topk_weights, rows, case.experts)
    y_nodes = None
    if ranks_per_node not in (None, case.world):  # several nodes (reference checks the value)
        y_nodes = reference.combine(outs, inp.topk_idx, inp.topk_weights, rows, case.experts,
                                    ranks_per_node=ranks_per_node)
    return Expected(case, inp, sent_xs, sent_scales, ref, rows, y, y_nodes)


def run_step(comm, rank: int, exp: Expected, *, zero_copy: bool,
             schedules: Sequence[str] = SCHEDULES, device=None) -> list[str]:
    """One rank's step on comm, per schedule: dispatch its inputs, run the fake expert on the
    received rows, combine, then compare with the reference. zero_copy: the expert's output is
    copied into the combine window (what a zero-copy expert writes), else it is passed as a
    fresh tensor. Returns the mismatch messages, each naming the case (empty: all matched)."""
    x, idx, w, scales = exp.rank_inputs(rank, device)
    out_dtype, errors = exp.case.out_dtype, []
    for schedule in schedules:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        ll = schedule == "low_latency"
        dispatch = comm.low_latency_dispatch if ll else comm.dispatch
        handle = dispatch(x, idx, w, x_scales=scales, quantize_fp8=exp.case.fused)
        expert_out = expert_output(handle, out_dtype)
        if zero_copy:
            window = comm.low_latency_combine_buffer if ll else comm.combine_buffer
            expert_out = window(out_dtype).copy_(expert_out)
        y = (comm.low_latency_combine if ll else comm.combine)(expert_out, handle)
        comm.check()
        errors += check_step(rank, exp, handle, y)
    return [f"{exp.case}: {e}" for e in errors]


def check_step(rank: int, exp: Expected, handle, y: torch.Tensor) -> list[str]:
    """One rank's dispatch result (either schedule) bit for bit, and its combine output y (of
    the fake expert's outputs) within `close`, against the reference (across nodes, the
    throughput combine bit for bit: Expected.y_nodes)."""
    if isinstance(handle, LowLatencyDispatchResult):
        ll_tokens = handle.recv_x.size(1) // exp.case.world
        ref, ref_rows = exp.low_latency(ll_tokens)
        errors = compare_low_latency(rank, handle, ref[rank], ref_rows[rank])
        op, msg = "low_latency_combine", close(y, exp.y[rank], exp.case.out_dtype)
    else:
        errors = compare_dispatch(rank, handle, exp.dispatch[rank], exp.token_rows[rank])
        op = "combine"
        msg = (close(y, exp.y[rank], exp.case.out_dtype) if exp.y_nodes is None
               else same_bits(y, exp.y_nodes[rank]))
    if msg:
        errors.append(f"rank {rank}: {op} {msg}")
    return errors


def expert_output(handle, out_dtype: torch.dtype) -> torch.Tensor:
    """The fake expert applied to a dispatch result of either schedule, shaped as that
    schedule's combine input (no host copy: capturable in a CUDA graph)."""
    if not isinstance(handle, LowLatencyDispatchResult):
        return fake_expert(handle.recv_x, handle.expert_offsets, out_dtype, handle.recv_scales)
    local, rows, hidden = handle.recv_x.shape  # expert j's rows packed at [j, :recv_counts[j]]
    flat = handle.recv_x.reshape(-1, hidden)
    offsets = torch.arange(local + 1, dtype=torch.int32, device=flat.device) * rows
    scales = handle.recv_scales
    if scales is not None:
        scales = scales.reshape(flat.size(0), -1)
    return fake_expert(flat, offsets, out_dtype, scales).view(local, rows, hidden)


def fake_expert(recv_x: torch.Tensor, expert_offsets: torch.Tensor, out_dtype: torch.dtype,
                recv_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A cheap, expert-dependent function of the rows: row * (1 + j/8) for local expert j.
    Returns [rows, hidden] in out_dtype (rows past expert_offsets[-1] are zeros). With
    expert_offsets on recv_x's device it copies nothing from the host (CUDA-graph capturable)."""
    rows = recv_x.size(0)
    x = recv_x.float()
    if recv_scales is not None:
        hidden = x.size(1)
        x = (x.view(rows, hidden // 128, 128) * recv_scales.float().unsqueeze(-1)).view(
            rows, hidden)
    offs = expert_offsets.long().to(recv_x.device)
    row_ids = torch.arange(rows, device=recv_x.device)
    expert = torch.bucketize(row_ids, offs[1:], right=True)
    scale = torch.where(row_ids < offs[-1], 1.0 + expert.float() / 8, x.new_zeros(()))
    return (x * scale.unsqueeze(1)).to(out_dtype)


def compare_dispatch(rank: int, got, ref: reference.RefDispatch, ref_token_rows) -> list[str]:
    """Bit-exact comparison of one rank's DispatchResult with the reference."""
    errors = []
    offs = got.expert_offsets.cpu()
    if not torch.equal(offs, ref.expert_offsets):
        errors.append(f"rank {rank}: expert_offsets {offs.tolist()} != "
                      f"{ref.expert_offsets.tolist()}")
        return errors
    rows = int(offs[-1])
    for name, a, b in (
        ("recv_x", got.recv_x[:rows], ref.recv_x),
        ("recv_src", got.recv_src[:rows], ref.recv_src),
        ("recv_weights", got.recv_weights[:rows], ref.recv_weights),
        ("token_rows", got.token_rows, ref_token_rows),
    ) + ((("recv_scales", got.recv_scales[:rows], ref.recv_scales),)
         if ref.recv_scales is not None else ()):
        msg = same_bits(a, b)
        if msg:
            errors.append(f"rank {rank}: {name} differs from the reference ({msg})")
    return errors


def compare_low_latency(rank: int, got, ref: reference.RefLowLatencyDispatch,
                        ref_token_rows) -> list[str]:
    """Bit-exact comparison of one rank's LowLatencyDispatchResult with the reference."""
    errors = []
    counts = got.recv_counts.cpu()
    if not torch.equal(counts, ref.recv_counts):
        return [f"rank {rank}: recv_counts {counts.tolist()} != {ref.recv_counts.tolist()}"]
    if not torch.equal(got.token_rows.cpu(), ref_token_rows):
        errors.append(f"rank {rank}: token_rows differ from the reference")
    for j, c in enumerate(counts.tolist()):
        for name, a, b in (("recv_x", got.recv_x, ref.recv_x), ("recv_src", got.recv_src,
                                                                 ref.recv_src),
                           ("recv_weights", got.recv_weights, ref.recv_weights)):
            if not torch.equal(_bits(a[j, :c].cpu()), _bits(b[j, :c])):
                errors.append(f"rank {rank}: {name} of local expert {j} differs")
    return errors


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    """None if a ~= b for the combine output's dtype, else a message."""
    a, b = a.float().cpu(), b.float().cpu()
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not torch.isfinite(a).all():
        return "non-finite values"
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    if err > tol * max(scale, 1.0):
        return f"max abs error {err:.3g} > {tol} * max(|ref|={scale:.3g}, 1)"
    return None


def same_bits(a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """None if a (any device) equals b bit for bit (dtype, shape and every bit), else a
    message."""
    a = a.cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    bad = (_bits(a) != _bits(b)).nonzero()
    if bad.numel():
        return f"{bad.size(0)} elements differ bit for bit, first at {bad[:3].tolist()}"
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Compare floating tensors bit for bit (so NaN == NaN and -0 != +0 like memcmp)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    return t
