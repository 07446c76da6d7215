"""The MoE-layer call of the Transformers integration: the communicator cache shared by every
MoE layer, and the dispatch -> local experts -> combine forward that each experts module runs
(see ``transformers.py``)."""
from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..communicator import Communicator, DispatchResult
from ..plan import CommConfig
from ._hf_experts import _local, run_local_experts

if TYPE_CHECKING:
    from .transformers import SwiftepMoEConfig


# ------------------------------------------------------------------------- communicators
_COMMS: dict[tuple, tuple[Any, Communicator]] = {}
_COMMS_LOCK = threading.Lock()


def _communicator(group, *, hidden: int, num_experts: int, top_k: int, dtype: torch.dtype,
                  device: torch.device, settings: SwiftepMoEConfig) -> Communicator:
    """One Communicator per (group, hidden, num_experts, top_k, dtype, sizes), shared by every
    MoE layer of every model on that group: the layers run one after the other."""
    group_key = (id(group), group.group_name) if group is not None else (0, "")
    key = (group_key, hidden, num_experts, top_k, dtype, str(device),
           settings.max_tokens_per_rank, settings.capacity, settings.num_sms, settings.timeout_s,
           settings.dispatch_fanout, settings.combine_partials)
    with _COMMS_LOCK:
        hit = _COMMS.get(key)
        if hit is None:
            extra = {} if settings.num_sms is None else {"num_sms": settings.num_sms}
            config = CommConfig(num_experts=num_experts, hidden=hidden, num_topk=top_k,
                                max_tokens_per_rank=settings.max_tokens_per_rank, dtype=dtype,
                                capacity=settings.capacity, timeout_s=settings.timeout_s,
                                dispatch_fanout=settings.dispatch_fanout,
                                combine_partials=settings.combine_partials, **extra)
            comm_device = device if device.type == "cuda" else None
            # the group is kept alive with its communicator, so its id is never reused under us
            hit = (group, Communicator(group, config, device=comm_device))
            _COMMS[key] = hit
    return hit[1]


def communicators() -> list[Communicator]:
    """The communicators the MoE layers of this process use (one per group and shape)."""
    with _COMMS_LOCK:
        return [comm for _, comm in _COMMS.values()]


def clear_communicators() -> None:
    """Drop the cached communicators (and their workspaces); call before destroying the
    process group they were built on."""
    with _COMMS_LOCK:
        _COMMS.clear()


# --------------------------------------------------------------------- the MoE layer call
@dataclasses.dataclass
class _EPGroup:
    """How one experts module talks to the others."""

    group: Any  # the EP process group (None: a world of one)
    rank: int
    world: int
    num_local: int
    # Ranks holding the same batch (the TP group): each dispatches only its slice of the batch
    # and the slices' outputs are all-gathered back. None when every rank has its own batch.
    batch_group: Any
    batch_rank: int
    batch_world: int
    settings: SwiftepMoEConfig

    @property
    def num_experts(self) -> int:
        return self.num_local * self.world


def _check_inference(hidden_states, top_k_weights):
    if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad):
        raise RuntimeError(
            "swiftep expert parallelism is inference-only (dispatch/combine have no autograd "
            "formula): run the model under torch.no_grad() or torch.inference_mode() "
            "(model.generate already does)")


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # all_gather_single is the newer name of all_gather_into_tensor (deprecated in torch 2.13)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def _slice_bounds(num_tokens: int, rank: int, world: int) -> tuple[int, int, int]:
    chunk = -(-num_tokens // world)
    start = min(num_tokens, rank * chunk)
    return start, min(num_tokens, start + chunk), chunk


def _moe_forward(ep: _EPGroup, module: torch.nn.Module, hidden_states: torch.Tensor,
                 top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    hidden_states, top_k_weights = _local(hidden_states), _local(top_k_weights)
    top_k_index = _local(top_k_index)
    _check_inference(hidden_states, top_k_weights)
    hidden = hidden_states.size(-1)
    x = hidden_states.reshape(-1, hidden)
    idx = top_k_index.reshape(x.size(0), -1)
    weights = top_k_weights.reshape(x.size(0), -1)
    num_tokens = x.size(0)
    sliced = ep.batch_group is not None and ep.batch_world > 1
    if sliced:
        start, end, chunk = _slice_bounds(num_tokens, ep.batch_rank, ep.batch_world)
        x, idx, weights = x[start:end], idx[start:end], weights[start:end]
    mine = x.size(0)
    limit = ep.settings.max_tokens_per_rank
    if mine > limit:
        shared = (f" ({num_tokens} tokens shared by {ep.batch_world} ranks)" if sliced else "")
        raise ValueError(
            f"this MoE layer call dispatches {mine} tokens from rank {ep.rank}{shared}, more "
            f"than max_tokens_per_rank={limit}; register the implementation with a larger "
            f"value, e.g. torch_swiftep.integrations.transformers.register("
            f"max_tokens_per_rank={max(mine, 2 * limit)}), or feed smaller batches")
    comm = _communicator(ep.group, hidden=hidden, num_experts=ep.num_experts,
                         top_k=idx.size(1), dtype=x.dtype, device=x.device, settings=ep.settings)
    handle: DispatchResult = comm.dispatch(
        x.contiguous(), idx.contiguous(), weights.to(torch.float32).contiguous())
    # The experts write straight into the combine window (zero copy), except inside
    # torch.compile, where a write into the window cannot reach the peers
    # (plan.WINDOW_UNDER_COMPILE): there they write a fresh tensor, which combine stages.
    out = (x.new_empty(handle.recv_x.size(0), hidden) if torch.compiler.is_compiling()
           else comm.combine_buffer(x.dtype))
    rows = int(handle.expert_offsets[-1])  # one host sync per layer: run only the live rows
    run_local_experts(module, handle.recv_x, handle.expert_offsets, rows, out,
                      ep.settings.experts_compute)
    y = comm.combine(out, handle)
    if sliced:
        padded = y.new_zeros(chunk, hidden)
        padded[:mine] = y
        gathered = y.new_empty(chunk * ep.batch_world, hidden)
        _all_gather(gathered, padded, ep.batch_group)
        y = gathered[:num_tokens]
    return y.reshape(*hidden_states.shape[:-1], hidden).to(hidden_states.dtype)
