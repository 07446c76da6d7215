"""A small expert-parallel MoE layer built on a Communicator: the example the compile tests,
CUDA-graph tests and the benchmark use. Router -> top-k -> dispatch -> grouped expert MLP on
the expert-major rows -> combine."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .activations import swiglu_rows
from .communicator import Communicator


class ExpertParallelMoE(nn.Module):
    """Rank r's shard of a top-k MoE layer with E experts (SwiGLU MLPs of width ffn).

    x: [num_tokens, hidden] -> [num_tokens, hidden]. The router is replicated; each rank keeps
    the weights of its E / W local experts only.
    low_latency: use the decode schedule (static [L, W*T, hidden] windows, CUDA-graph friendly).
    """

    def __init__(self, comm: Communicator, ffn: int, *, low_latency: bool = False,
                 seed: int = 0, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        cfg = comm.config
        self.comm, self.low_latency, self.top_k = comm, low_latency, cfg.num_topk
        gen = torch.Generator().manual_seed(seed)
        experts, hidden, local = cfg.num_experts, cfg.hidden, comm.num_local_experts
        first = comm.rank * local

        def draw(*shape, scale):
            return (torch.randn(*shape, generator=gen) * scale).to(dtype)

        router = draw(experts, hidden, scale=hidden ** -0.5)
        # every rank draws every expert (same generator), then keeps its own: the layer equals
        # the unsharded one for any world size
        w_gate_up = draw(experts, hidden, 2 * ffn, scale=hidden ** -0.5)[first:first + local]
        w_down = draw(experts, ffn, hidden, scale=ffn ** -0.5)[first:first + local]
        device = comm.device
        self.router = nn.Parameter(router.to(device), requires_grad=False)
        self.w_gate_up = nn.Parameter(w_gate_up.contiguous().to(device), requires_grad=False)
        self.w_down = nn.Parameter(w_down.contiguous().to(device), requires_grad=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (x @ self.router.t()).float().softmax(dim=-1)
        weights, idx = scores.topk(self.top_k, dim=-1)
        return idx, weights / weights.sum(dim=-1, keepdim=True)

    def experts(self, rows: torch.Tensor, offs: torch.Tensor, pool=None) -> torch.Tensor:
        """Grouped SwiGLU MLP over expert-major rows; offs: [L] int32 end offsets (rows past
        offs[-1] of the result are unspecified). pool: a context the output alone is allocated
        in (the intermediates stay out of it)."""
        gate_up = torch._grouped_mm(rows, self.w_gate_up, offs=offs)
        # over the rows the window holds, not its capacity (the same bits as F.silu(g) * u)
        hidden = swiglu_rows(gate_up, offs)
        with pool if pool is not None else contextlib.nullcontext():
            return torch._grouped_mm(hidden, self.w_down, offs=offs)

    def experts_low_latency(self, recv_x: torch.Tensor, out=None) -> torch.Tensor:
        """The same MLP over the static [L, S, hidden] low-latency window (bmm): rows past
        recv_counts[j] are computed and ignored. out: where the output goes (bmm's out=)."""
        gate_up = torch.bmm(recv_x, self.w_gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.w_down, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, weights = self.route(x)
        if self.low_latency:
            handle = self.comm.low_latency_dispatch(x, idx, weights)
            # Eager and in CUDA graphs the last bmm writes straight into the low-latency combine
            # window (zero copy, as bmm takes out=); traced, its fresh output is staged.
            window = (None if torch.compiler.is_compiling()
                      else self.comm.low_latency_combine_buffer(x.dtype))
            out = self.experts_low_latency(handle.recv_x, out=window)
            return self.comm.low_latency_combine(out, handle)
        handle = self.comm.dispatch(x, idx, weights)
        offs = handle.expert_offsets[1:]
        # The pool's first entry and the lookup of a tensor's segment run on the host, and a
        # world emulated in one process has no pool: there the GEMM's fresh tensor is staged
        # by combine (its few SMs).
        emulated = self.comm.world_size > 1 and not self.comm.group_name
        if emulated or torch.compiler.is_compiling() or (
                x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self.comm.combine(self.experts(handle.recv_x, offs), handle)
        # Eager: the GEMM's output is allocated in the symmetric pool and every owner's is read
        # in place by the combine (no copy at all; docs/perf-notes.md).
        out = self.experts(handle.recv_x, offs, pool=self.comm.expert_output_pool())
        return self.comm.combine(out, handle, symmetric=True)


def dense_reference(layers: list[ExpertParallelMoE], x: torch.Tensor) -> torch.Tensor:
    """The unsharded layer computed token by token from every rank's shard (tests)."""
    first = layers[0]
    idx, weights = first.route(x)
    w_gate_up = torch.cat([layer.w_gate_up for layer in layers]).float()
    w_down = torch.cat([layer.w_down for layer in layers]).float()
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for n in range(x.size(0)):
        for k in range(idx.size(1)):
            e = int(idx[n, k])
            gate, up = (x[n].float() @ w_gate_up[e]).chunk(2)
            y[n] += weights[n, k] * ((F.silu(gate) * up) @ w_down[e])
    return y.to(x.dtype)
