"""W ranks emulated inside ONE process on one GPU, for the GPU benchmarks.

Each rank has its own workspace and stream; the peer table is built by hand
(Communicator.emulated_world), so the kernels are exactly those of a real multi-GPU run, with
NVLink replaced by HBM. A step runs every rank's calls on its own stream (fork/join), so it can
be captured in one CUDA graph and replayed. The inputs are a testing.Case's; the combines read
the fake expert's outputs (fill_combine_windows), so a step checks against testing's reference.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import CommConfig, Communicator, LowLatencyDispatchResult, testing
from .metrics import RoutingBytes
from .timing import fork_join


class EmulatedWorld:
    def __init__(self, world, tokens, hidden, topk, experts, dtype, device, seed=0,
                 ll_tokens=0, routing="uniform"):
        self.world, self.tokens, self.hidden, self.topk, self.experts, self.dtype = (
            world, tokens, hidden, topk, experts, dtype)
        self.case = testing.Case(seed, dtype, hidden, topk, routing, experts, (tokens,) * world)
        self.inputs = testing.world_inputs(seed, self.case.tokens, hidden, experts, topk, dtype,
                                           routing)
        rows_expected = tokens * topk  # per rank under uniform routing
        config = CommConfig(num_experts=experts, hidden=hidden, num_topk=topk,
                            max_tokens_per_rank=tokens, dtype=dtype,
                            capacity=max(rows_expected + rows_expected // 4, 1024),
                            ll_max_tokens_per_rank=ll_tokens, timeout_s=10.0)
        self.comms = Communicator.emulated_world(config, world, device)
        self.streams = [torch.cuda.Stream(device) for _ in range(world)]
        dev = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        self.xs, self.idx, self.w = (dev(self.inputs.xs), dev(self.inputs.topk_idx),
                                     dev(self.inputs.topk_weights))
        self.routing = [RoutingBytes.of(i, experts, world) for i in self.inputs.topk_idx]
        self._expected = {}
        self.expert_outs = []  # per rank: the experts' outputs in a tensor of their own

    def dispatch_step(self, num_sms, fp8=False):
        def make(r):
            return lambda: self.comms[r].dispatch(self.xs[r], self.idx[r], self.w[r],
                                                  num_sms=num_sms, quantize_fp8=fp8)
        return lambda: fork_join([make(r) for r in range(self.world)], self.streams)

    def dispatch_combine_step(self, num_sms, fp8=False, own_tensor=False):
        """own_tensor: combine reads the experts' outputs from a tensor of their own (as a
        grouped GEMM returns it; fill_combine_windows made it), not from the combine window."""
        def make(r):
            def call():
                comm = self.comms[r]
                h = comm.dispatch(self.xs[r], self.idx[r], self.w[r], num_sms=num_sms,
                                  quantize_fp8=fp8)
                out = self.expert_outs[r] if own_tensor else comm.combine_buffer()
                return h, comm.combine(out, h, num_sms=num_sms)
            return call
        return lambda: fork_join([make(r) for r in range(self.world)], self.streams)

    def fill_combine_windows(self, handles):
        """Writes the fake expert's outputs of every rank's dispatch result (either schedule)
        into that schedule's combine window, which the steps' combines read, and into a tensor
        of their own (expert_outs[r]). Dispatch is deterministic, so later dispatches of the
        same inputs receive the same rows."""
        self.expert_outs = []
        for comm, handle in zip(self.comms, handles):
            ll = isinstance(handle, LowLatencyDispatchResult)
            window = comm.low_latency_combine_buffer() if ll else comm.combine_buffer()
            window.copy_(testing.expert_output(handle, window.dtype))
            self.expert_outs.append(window.clone())

    def expected(self, fp8=False) -> testing.Expected:
        """The reference of this world's case (fp8: dispatch quantizes, quantize_fp8=True)."""
        if fp8 not in self._expected:
            case = dataclasses.replace(self.case, fp8="fused" if fp8 else False)
            self._expected[fp8] = testing.expected(case)
        return self._expected[fp8]

    def check(self, pairs, ranks, fp8=False) -> list[str]:
        """testing.check_step of the given ranks' (dispatch result, combine output) pairs, of
        either schedule, after fill_combine_windows."""
        exp = self.expected(fp8)
        errors = []
        for r in ranks:
            errors += testing.check_step(r, exp, *pairs[r])
        return errors

    def free(self):
        del self.comms
        torch.cuda.empty_cache()
