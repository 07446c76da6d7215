"""DeepEP's intranode dispatch/combine (the release before its V2: 1.2.1) as a peer of the
multi-process benchmark (multi_process.py), with the same inputs, when `import deep_ep` works.

DeepEP is never vendored: fetch its source into an ignored folder and build it intranode-only
with scripts/build_deepep.sh, then put the build on PYTHONPATH.

What is measured, per SM budget, all the way a user calls it:
- dispatch = Buffer.get_dispatch_layout + Buffer.dispatch (with topk_idx / topk_weights);
- combine = Buffer.combine of the dispatched rows (DeepEP's combine adds the rows each rank
  sends back, without weights: its experts' outputs are already weighted per (token, rank));
- step = both;
- with the permutation its users add ("deepep+permute"): DeepEP's dispatch returns one row per
  (token, rank), token-major, so a grouped GEMM first needs the rows in expert-major order, and
  its combine wants one weighted row per (token, rank) back. Both are timed as torch code on the
  whole GPU (argsort + index_select; index_copy_ back to (token, slot) places + a batched
  weighted sum, bmm), eager with exact row counts, CUDA events (timing.time_fn, median of
  PERMUTE_ITERS), and added to dispatch and combine. Plain torch, not a fused kernel: a fused
  permute would read and write each row once, so these figures are an upper bound of what its
  users pay. swiftep's dispatch writes expert-major rows and its combine takes them: no such
  step.
SM budget: Buffer.set_num_sms(n) is per rank: each rank's dispatch and combine kernels run n
blocks (n / 2 channels, a sender and a receiver block each); n must be even. The configs are
DeepEP's defaults for the world size (Buffer.get_dispatch_config / get_combine_config), the
NVLink buffer the larger of their size hints.

Timing: DeepEP's intranode dispatch syncs with the host (it waits for the received-token count)
unless num_worst_tokens is given; with it (tokens x world, as DeepEP's tests use) nothing syncs
and the calls are captured and timed exactly as swiftep's (chained CUDA graphs, slope). If any
rank cannot capture, every rank falls back to CUDA events after a host barrier (median of
timing.ITERS, no num_worst_tokens) and the result says so.

Each SM budget runs in its own world of processes, so a budget that hangs (e.g. more blocks
than fit on the GPU at once) costs that budget only. Before timing, each world checks one
round trip at the small token count: every rank receives the (token, rank) pairs the routing
implies, and combine returns each token times the number of ranks it went to.
"""
from __future__ import annotations

SM_BUDGET = ("per rank: Buffer.set_num_sms(n), n blocks per rank's dispatch/combine kernel "
             "(n/2 channels); n must be even")
GRAPH_TIMING = "chained CUDA graphs (num_worst_tokens = tokens x world), as swiftep's"
PERMUTE_ITERS = 10
PERMUTE_NOTE = ("dispatch + torch permutation to expert-major rows, combine + torch weighted fold "
                "back to (token, rank) rows (whole GPU, eager, exact counts)")
EVENT_TIMING = ("CUDA events after a host barrier (capture failed; no num_worst_tokens: the "
                "dispatch syncs with the host)")


def import_error() -> str | None:
    """None if deep_ep imports here, else why not."""
    try:
        import deep_ep  # noqa: F401
    except Exception as exc:  # ImportError, or the extension failing to load
        return f"import deep_ep failed ({type(exc).__name__}: {exc})"
    return None


class _Calls:
    """One rank's DeepEP calls on fixed inputs."""

    def __init__(self, buffer, x, topk_idx, topk_weights, experts):
        self.buffer, self.x, self.idx, self.w, self.experts = (buffer, x, topk_idx, topk_weights,
                                                               experts)

    def dispatch(self, worst: int):
        recv_x, _, _, _, handle, _ = self.buffer.dispatch(
            self.x, topk_idx=self.idx, topk_weights=self.w, num_worst_tokens=worst,
            **_layout_kwargs(self))
        return recv_x, handle

    def step(self, worst: int):
        recv_x, handle = self.dispatch(worst)
        y, _, _ = self.buffer.combine(recv_x, handle)
        return y


def permutation_ms(calls, num_local: int) -> dict:
    """{to_experts, from_experts}: ms of the torch code a DeepEP user runs around the experts
    (module docstring), on this rank's rows from one host-synced dispatch."""
    import torch

    recv_x, recv_idx, recv_w, _, _, _ = calls.buffer.dispatch(
        calls.x, topk_idx=calls.idx, topk_weights=calls.w, **_layout_kwargs(calls))
    flat = recv_idx.reshape(-1)
    pairs, k = int((flat >= 0).sum()), recv_idx.size(1)  # outside the timed code: no sync there
    rows = recv_x.size(0)

    def to_experts():
        order = torch.argsort(torch.where(flat >= 0, flat, num_local), stable=True)[:pairs]
        return order, recv_x.index_select(0, order // k)

    order, expert_rows = to_experts()

    def from_experts():  # back to (token, slot) places, then one weighted sum per token
        slots = expert_rows.new_zeros(rows * k, expert_rows.size(1)).index_copy_(
            0, order, expert_rows)
        return torch.bmm(recv_w.view(rows, 1, k).to(slots.dtype), slots.view(rows, k, -1))

    from .timing import time_fn

    return {name: time_fn(fn, PERMUTE_ITERS) for name, fn in (("to_experts", to_experts),
                                                              ("from_experts", from_experts))}


def _layout_kwargs(calls) -> dict:
    n_rank, _, n_expert, in_rank, _ = calls.buffer.get_dispatch_layout(calls.idx, calls.experts)
    return dict(num_tokens_per_rank=n_rank, num_tokens_per_expert=n_expert,
                is_token_in_rank=in_rank)


def _check(buffer, rank, shape, idx_dtype, device) -> list[str]:
    """One round trip at check_tokens per rank (eager, host-synced dispatch)."""
    import torch

    from .. import testing
    from .multi_process import rank_inputs

    world, local = shape["world"], shape["experts"] // shape["world"]
    tokens = min(shape["check_tokens"], shape["tokens"])
    x, idx, w, every_idx = rank_inputs(shape, tokens, rank, device, seed=1)
    calls = _Calls(buffer, x, idx.to(idx_dtype), w, shape["experts"])
    recv_x, handle = calls.dispatch(0)
    y, _, _ = buffer.combine(recv_x, handle)
    torch.cuda.synchronize()
    owners = [torch.where(i >= 0, i // local, -1) for i in every_idx]
    want = sum(int((o == rank).any(1).sum()) for o in owners)
    errors = []
    if recv_x.size(0) != want:
        errors.append(f"rank {rank}: DeepEP dispatch received {recv_x.size(0)} rows, the routing "
                      f"sends it {want}")
    mine = owners[rank]
    ranks_per_token = (mine.unsqueeze(-1) == torch.arange(world)).any(1).sum(1)
    msg = testing.close(y, x.float().cpu() * ranks_per_token.unsqueeze(1), torch.bfloat16)
    if msg:
        errors.append(f"rank {rank}: DeepEP combine of the dispatched rows: {msg}")
    return errors


def _time(calls, group, shape, chain, repeats) -> tuple[str, dict]:
    """(how it was timed, {dispatch, combine, step} ms per call on this rank)."""
    from .rank_timing import time_dispatch_and_step

    worst = shape["tokens"] * shape["world"]
    failed, ops = time_dispatch_and_step(
        group, (lambda: calls.dispatch(worst), lambda: calls.step(worst)),
        (lambda: calls.dispatch(0), lambda: calls.step(0)), chain, repeats)
    return (GRAPH_TIMING if failed is None else f"{EVENT_TIMING}: {failed}"), ops


def _rank(rank, world, shape, sms, chain, repeats):
    import deep_ep
    import torch
    import torch.distributed as dist

    from ..launch import rank_gpu
    from .multi_process import agree, rank_inputs

    device = torch.device("cuda", rank_gpu(rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    group = dist.group.WORLD
    deep_ep.Buffer.set_num_sms(sms)  # read by get_dispatch_config / get_combine_config
    configs = (deep_ep.Buffer.get_dispatch_config(world), deep_ep.Buffer.get_combine_config(world))
    nvl_bytes = max(c.get_nvl_buffer_size_hint(shape["hidden"] * 2, world) for c in configs)
    # intranode only (no RDMA bytes); destroyed explicitly once every rank is done (its
    # destructor would wait for the peers on the device, also on an error path)
    buffer = deep_ep.Buffer(group, nvl_bytes, 0, explicitly_destroy=True)
    idx_dtype = getattr(deep_ep, "topk_idx_t", torch.int64)
    errors = _check(buffer, rank, shape, idx_dtype, device) if shape["check_tokens"] else []
    if any(agree(errors, group)):
        buffer.destroy()
        return dict(errors=errors)
    x, idx, w, _ = rank_inputs(shape, shape["tokens"], rank, device, seed=shape["tokens"])
    calls = _Calls(buffer, x, idx.to(idx_dtype), w, shape["experts"])
    timing, ops = _time(calls, group, shape, chain, repeats)
    permute = permutation_ms(calls, shape["experts"] // world)
    torch.cuda.synchronize()
    del calls
    buffer.destroy()
    return dict(errors=[], timing=timing, ops=ops, permute=permute, nvl_bytes=nvl_bytes)


def with_permutation(ops: dict, perm: dict) -> dict:
    """DeepEP's {dispatch, combine, step} ms with its users' permutation added (docstring)."""
    d, c = ops["dispatch"] + perm["to_experts"], ops["combine"] + perm["from_experts"]
    return dict(dispatch=d, combine=c, step=ops["step"] + perm["to_experts"]
                + perm["from_experts"], **{f"permute_{k}": v for k, v in perm.items()})


def run(shape: dict, budgets, chain, repeats, timeout_s) -> dict:
    """{status, timing, sm_budget, by_sms {sms: {dispatch, combine, step} ms of the slowest
    rank}, notes, errors}; status "not run: <reason>" when deep_ep does not import."""
    reason = import_error()
    if reason:
        print(f"DeepEP: not run: {reason}", flush=True)
        return dict(status=f"not run: {reason}", sm_budget=SM_BUDGET)
    if shape["world"] not in (2, 4, 8):  # DeepEP's intranode kernels are built for these
        reason = f"not run: DeepEP intranode takes 2, 4 or 8 ranks, not {shape['world']}"
        print(f"DeepEP: {reason}", flush=True)
        return dict(status=reason, sm_budget=SM_BUDGET)
    import deep_ep

    from ..launch import WorldError, run_world
    from .multi_process import ENV
    from .multi_process_records import slowest

    result = dict(status="ran", sm_budget=SM_BUDGET, module=getattr(deep_ep, "__file__", "?"),
                  by_sms={}, notes=[], errors=[], timing=None)
    for sms in budgets:
        if sms % 2:
            result["notes"].append(f"{sms} SMs/rank: skipped (DeepEP's SM count must be even)")
            continue
        try:
            ranks = run_world(shape["world"], _rank, shape, sms, chain, repeats, env=ENV,
                              timeout_s=min(timeout_s, 600))
        except WorldError as exc:
            result["notes"].append(f"{sms} SMs/rank: failed ({str(exc).splitlines()[0]})")
            print(f"DeepEP, {sms} SMs/rank: failed: {exc}", flush=True)
            continue
        errors = [e for r in ranks for e in r["errors"]]
        if errors:
            result["errors"] += errors
            result["notes"].append(f"{sms} SMs/rank: check FAILED, not timed ({errors[0]})")
            continue
        result["by_sms"][sms] = slowest([r["ops"] for r in ranks])
        perm = slowest([r["permute"] for r in ranks])
        result.setdefault("permuted_by_sms", {})[sms] = with_permutation(result["by_sms"][sms],
                                                                         perm)
        timings = sorted({r["timing"] for r in ranks})
        result["timing"] = "; ".join(timings)
        print(f"  DeepEP, {sms} SMs/rank: dispatch {result['by_sms'][sms]['dispatch']:.3f} ms, "
              f"combine {result['by_sms'][sms]['combine']:.3f} ms ({timings[0][:40]})",
              flush=True)
    if not result["by_sms"]:
        result["status"] = "failed at every SM budget" if budgets else "no SM budget"
    return result
