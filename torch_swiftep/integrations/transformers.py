"""Serve a HuggingFace Transformers MoE checkpoint expert-parallel through swiftep.

    import torch_swiftep.integrations.transformers as swiftep_hf   # registers "swiftep"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, **swiftep_hf.expert_parallel_kwargs(path))            # under torchrun
    model.generate(...)

Importing this module registers an implementation named "swiftep" with Transformers' public
registries; nothing in a model class is patched:

- transformers >= 5.23 (``EPImplementationInterface`` exists): an ``EPImplementation``, selected
  with ``DistributedConfig(ep_size=W, ep_implementation="swiftep", ...)``. Transformers shards
  the experts itself (its ``grouped_gemm`` parameter style, expert dimension, at load time) and
  hands every ``ep_dispatch_experts`` module's call to ``SwiftepEP``.
- transformers 5.17 - 5.22 (no EP registry): an experts implementation in ``ExpertsInterface``
  (``from_pretrained(..., experts_implementation="swiftep")``), with the expert parameters
  sharded at load time by Transformers' own ``grouped_gemm`` style in the TP plan, and the
  experts module marked with the style ``"swiftep_experts"`` (registered in
  ``ALL_PARALLEL_STYLES``) so no other TP style wraps it.

``expert_parallel_kwargs`` builds the right ``from_pretrained`` keyword arguments for the
installed version. In both cases a MoE layer runs: router (the model's own, replicated, global
expert ids) -> ``Communicator.dispatch`` -> this rank's experts on the expert-major rows (written
straight into the combine window) -> ``Communicator.combine`` (weighted sum, float32).
Shared experts (DeepSeek-V3 and others) are ordinary modules outside the experts module: they
stay replicated and untouched. The expert math is the experts module's own: gate/up fused or
not (``has_gate``), stored transposed or not (``is_transposed``), biases (``has_bias``), its
``_apply_gate`` (e.g. GPT-OSS's clamped SwiGLU) or ``act_fn``, and ``post_expert_norm``.

Inference only: the dispatch/combine ops have no autograd formula, so a forward that needs
gradients through the experts raises.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
import weakref
from typing import Any

import torch
import torch.distributed as dist

try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "torch_swiftep.integrations.transformers needs the `transformers` package "
        "(pip install 'torch_swiftep[transformers]')"
    ) from exc

from packaging.version import Version

from ._hf_experts import (  # noqa: F401 - re-exported: tests and callers use these names
    EXPERT_PARAMS,
    _activation,
    _expert_param_names,
    _grouped_mm_fn,
    _local,
    _local_experts,
    _LocalExperts,
    _use_grouped_mm,
    is_fused_experts,
    run_local_experts,
)
from ._hf_moe import (  # noqa: F401 - re-exported: tests and callers use these names
    _COMMS,
    _COMMS_LOCK,
    _all_gather,
    _check_inference,
    _communicator,
    _EPGroup,
    _moe_forward,
    _slice_bounds,
    clear_communicators,
    communicators,
)

__all__ = [
    "DEFAULT_NAME",
    "MIN_TRANSFORMERS",
    "SwiftepMoEConfig",
    "clear_communicators",
    "communicators",
    "expert_parallel_kwargs",
    "expert_parameter_bytes",
    "has_ep_registry",
    "is_fused_experts",
    "register",
    "swiftep_experts_forward",
]

DEFAULT_NAME = "swiftep"
# 5.17 is the oldest release with everything the experts-implementation path needs
# (ExpertsInterface + use_experts_implementation attributes, DistributedConfig(tp_plan=...) and
# the "grouped_gemm" expert-dimension parameter style) that this integration was tested on.
MIN_TRANSFORMERS = "5.17"
# Names of the no-op parallel styles registered in ALL_PARALLEL_STYLES: one marks an experts
# module on the experts-implementation path (so no TP style wraps it), the other keeps a dense
# module whole on every rank (expert_parallel_kwargs(dense="replicated")).
MARKER_STYLE = "swiftep_experts"
REPLICATED_STYLE = "swiftep_replicated"

_TRANSFORMERS_VERSION = Version(transformers.__version__)
if _TRANSFORMERS_VERSION < Version(MIN_TRANSFORMERS):
    warnings.warn(f"torch_swiftep's Transformers integration is tested with transformers >= "
                  f"{MIN_TRANSFORMERS}; found {transformers.__version__}", stacklevel=2)


@dataclasses.dataclass(frozen=True)
class SwiftepMoEConfig:
    """How the MoE layers of a model use swiftep (one set per registered name).

    max_tokens_per_rank: most tokens one rank dispatches in one layer call: the whole batch
        (batch * sequence length at prefill) divided by the number of ranks sharing it when the
        ranks share one batch (tensor-parallel dense layers), the rank's own batch otherwise.
        A forward that exceeds it raises ValueError; the communication windows are sized from it.
    capacity: rows of each rank's receive window (None: the worst case, see CommConfig).
    num_sms: SMs for the communication kernels (None: CommConfig's default).
    timeout_s: bound of every wait for another rank.
    dispatch_fanout: CommConfig's (one row per (token, remote rank) crosses the link).
    combine_partials: CommConfig's (one partial per (token, owner rank) crosses back).
    experts_compute: "auto" (grouped_mm on CUDA bf16/fp16, else a per-expert loop), "loop" or
        "grouped_mm" (torch's grouped GEMM on any device/dtype that supports it).
    """

    max_tokens_per_rank: int = 4096
    capacity: int | None = None
    num_sms: int | None = None
    timeout_s: float = 60.0
    dispatch_fanout: bool = False
    combine_partials: bool = False
    experts_compute: str = "auto"

    def __post_init__(self):
        if not isinstance(self.max_tokens_per_rank, int) or self.max_tokens_per_rank <= 0:
            raise ValueError(f"max_tokens_per_rank must be a positive int, got "
                             f"{self.max_tokens_per_rank!r}")
        if self.experts_compute not in ("auto", "loop", "grouped_mm"):
            raise ValueError(f"experts_compute must be 'auto', 'loop' or 'grouped_mm', got "
                             f"{self.experts_compute!r}")


# ----------------------------------------------------------------------- version probing
def _ep_registry():
    """(EPImplementation, EPImplementationInterface) on transformers >= 5.23, else None."""
    try:
        from transformers.distributed.expert_parallel import (
            EPImplementation,
            EPImplementationInterface,
        )
    except ImportError:
        return None
    return EPImplementation, EPImplementationInterface


def has_ep_registry() -> bool:
    """Whether the installed transformers selects EP implementations through DistributedConfig."""
    return _ep_registry() is not None


def _experts_interface():
    from transformers.integrations.moe import ExpertsInterface

    return ExpertsInterface


def _parallel_styles():
    """(ALL_PARALLEL_STYLES, TensorParallelLayer) or (None, None) without torch.distributed."""
    try:
        from transformers.distributed.tensor_parallel import (
            ALL_PARALLEL_STYLES,
            TensorParallelLayer,
        )
    except ImportError:
        return None, None
    return ALL_PARALLEL_STYLES, TensorParallelLayer


# ------------------------------------------------------------ transformers >= 5.23: EP registry
_SETTINGS: dict[str, SwiftepMoEConfig] = {}
_EXPERTS_FORWARDS: dict[str, Any] = {}


def _make_ep_implementation(name: str, _settings: SwiftepMoEConfig):
    EPImplementation, _ = _ep_registry()

    class SwiftepEP(EPImplementation):
        """Transformers ``EPImplementation`` running an ``ep_dispatch_experts`` module through
        swiftep dispatch/combine. Built once per experts module by Transformers; the
        Communicator is shared by all of them."""

        implementation_name = name
        settings = _settings

        def __init__(self, experts, ep_mesh, tp_mesh):
            super().__init__(experts, ep_mesh, tp_mesh)
            if not is_fused_experts(experts):
                raise TypeError(f"{type(experts).__name__} is not a fused experts module "
                                "(use_experts_implementation): swiftep cannot run it")
            self.experts = experts
            group = ep_mesh.get_group()
            if group.rank() != ep_mesh.get_local_rank():
                raise RuntimeError("the EP mesh's local rank differs from its group rank")
            batch_group = tp_mesh.get_group() if tp_mesh.size() > 1 else None
            self.ep = _EPGroup(group=group, rank=ep_mesh.get_local_rank(), world=ep_mesh.size(),
                               num_local=self.num_local_experts, batch_group=batch_group,
                               batch_rank=tp_mesh.get_local_rank(), batch_world=tp_mesh.size(),
                               settings=self.settings)

        def __call__(self, hidden_states, top_k_index, top_k_weights):
            return _moe_forward(self.ep, self.experts, hidden_states, top_k_index, top_k_weights)

    SwiftepEP.__name__ = SwiftepEP.__qualname__ = f"SwiftepEP_{name}"
    return SwiftepEP


# ------------------------------------------------- transformers 5.17 - 5.22: experts interface
_MODULE_EP: weakref.WeakKeyDictionary[torch.nn.Module, _EPGroup] = weakref.WeakKeyDictionary()


def _make_noop_style():
    _, TensorParallelLayer = _parallel_styles()
    base = TensorParallelLayer if TensorParallelLayer is not None else object

    class SwiftepKeepStyle(base):
        """A parallel style that does nothing: the module or parameter it names stays whole on
        every rank and its forward is left alone. As "swiftep_experts" it takes an experts
        module's TP rule, so no other style wraps it (its parameters are sharded by their own
        "grouped_gemm" rules, its experts implementation does the dispatch/combine); as
        "swiftep_replicated" it keeps a dense module replicated."""

        def should_use_local_tensors(self, module):
            return False

        def validate_param(self, module, param, mesh, parameter_name=None):
            pass

        def shard_param(self, module, param, mesh):
            pass

        def install_forward(self, module, mesh, *args, **kwargs):
            return module

    return SwiftepKeepStyle()


def _ep_group_from_module(module: torch.nn.Module, settings: SwiftepMoEConfig) -> _EPGroup:
    params = [module._parameters[n] for n in _expert_param_names(module)]
    sharded = [p for p in params if hasattr(p, "device_mesh") and hasattr(p, "to_local")]
    if not sharded:
        # Whole experts on this rank (loaded without a distributed config): a world of one.
        num_local = params[0].size(0)
        return _EPGroup(None, 0, 1, num_local, None, 0, 1, settings)
    mesh = sharded[0].device_mesh
    if mesh.ndim != 1:
        raise RuntimeError(f"expected the expert parameters sharded over a 1-D mesh, got "
                           f"{mesh}")
    for p in sharded:
        placement = p.placements[0]
        if not (placement.is_shard() and placement.dim == 0):
            raise RuntimeError(
                f"expert parameters of {type(module).__name__} must be sharded on the expert "
                f"dimension (the 'grouped_gemm' style), got placements {p.placements}")
    if len(sharded) != len(params):
        raise RuntimeError(f"some expert parameters of {type(module).__name__} are sharded and "
                           "some are not: shard them all with the 'grouped_gemm' style")
    group, world = mesh.get_group(), mesh.size()
    global_experts = sharded[0].shape[0]
    if global_experts % world:
        raise ValueError(f"{global_experts} experts do not split over {world} ranks")
    # The TP mesh's ranks share one batch (5.17 - 5.22 have no data-parallel EP here).
    return _EPGroup(group, mesh.get_local_rank(), world, global_experts // world,
                    group, mesh.get_local_rank(), world, settings)


def _make_experts_forward(name: str, settings: SwiftepMoEConfig):
    def swiftep_experts_forward(self, hidden_states, top_k_index, top_k_weights, *args,
                                **kwargs):
        """``experts_implementation="swiftep"``: dispatch -> local experts -> combine."""
        ep = _MODULE_EP.get(self)
        if ep is None:
            ep = _ep_group_from_module(self, settings)
            _MODULE_EP[self] = ep
        return _moe_forward(ep, self, hidden_states, top_k_index, top_k_weights)

    swiftep_experts_forward.__name__ = f"swiftep_experts_forward_{name}"
    return swiftep_experts_forward


# ----------------------------------------------------------------------------- registration
def register(name: str = DEFAULT_NAME, **settings) -> SwiftepMoEConfig:
    """Register (or re-register) the implementation ``name`` with ``SwiftepMoEConfig(**settings)``
    in every registry the installed transformers has. Importing this module registers
    ``"swiftep"`` with the defaults. Register the same settings on every rank, before
    ``from_pretrained``."""
    config = SwiftepMoEConfig(**settings)
    _SETTINGS[name] = config
    _EXPERTS_FORWARDS[name] = _make_experts_forward(name, config)
    _experts_interface().register(name, _EXPERTS_FORWARDS[name])
    if (registry := _ep_registry()) is not None:
        registry[1].register(name, _make_ep_implementation(name, config))
    styles, _ = _parallel_styles()
    if styles is not None:
        for style in (MARKER_STYLE, REPLICATED_STYLE):
            if style not in styles:
                type(styles).register(style, _make_noop_style())
    return config


# ------------------------------------------------------------------ from_pretrained helpers
def _world_size(world_size: int | None) -> int:
    if world_size is not None:
        return int(world_size)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    raise ValueError("world_size is not given and torch.distributed is not initialized")


def _skeleton(config, model_class):
    """The model on the meta device: its module names, plans and experts modules, no memory."""
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):
            return model_class.from_config(config)
        return model_class(config)


def _wildcard(name: str) -> str:
    import re

    return re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name)


def _experts_plan(skeleton) -> tuple[list[str], dict[str, str]]:
    """(experts module patterns, {expert parameter pattern: "grouped_gemm"})."""
    modules, params = [], {}
    for mod_name, module in skeleton.named_modules():
        if not is_fused_experts(module):
            continue
        pattern = _wildcard(mod_name)
        if pattern not in modules:
            modules.append(pattern)
        for p in _expert_param_names(module):
            params[f"{pattern}.{p}"] = "grouped_gemm"
    return modules, params


def _is_under(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def expert_parallel_kwargs(model, *, world_size: int | None = None,
                           implementation: str = DEFAULT_NAME, mechanism: str = "auto",
                           dense: str = "replicated", model_class=None,
                           **distributed_config) -> dict:
    """Keyword arguments for ``from_pretrained`` that load ``model`` (a path, hub id or config)
    with its routed experts sharded over ``world_size`` ranks (default: the initialized process
    group's size) and every MoE layer routed through the swiftep implementation
    ``implementation`` (see ``register``).

    mechanism: "ep_registry" (transformers >= 5.23: ``DistributedConfig(tp_size=W, ep_size=W,
        ep_implementation=implementation)``), "experts_implementation" (every supported version:
        ``experts_implementation=implementation``, expert parameters sharded by "grouped_gemm"
        rules of the TP plan), or "auto" (the registry where it exists).
    dense: "replicated" (default): everything but the routed experts (attention, dense MLPs,
        shared experts, embeddings, head) stays whole on every rank: the model's TP rules are
        overridden with the no-op style "swiftep_replicated". "tp": the model's own TP plan
        shards the dense layers over the same ranks.
    model_class: the class ``from_pretrained`` is called on (default AutoModelForCausalLM); only
        its module names are used, to spell the plan (built on the meta device).
    distributed_config: extra ``DistributedConfig`` fields, e.g. ``tp_size=1, fsdp_size=W`` on
        >= 5.23 for ranks that each serve their own batch (dense layers then FSDP-sharded).
    """
    if implementation not in _SETTINGS:
        raise KeyError(f"no swiftep implementation named {implementation!r} is registered; call "
                       f"register({implementation!r}, ...) first")
    if dense not in ("replicated", "tp"):
        raise ValueError(f"dense must be 'replicated' or 'tp', got {dense!r}")
    from transformers import AutoConfig
    from transformers.distributed import DistributedConfig

    world = _world_size(world_size)
    config = model if isinstance(model, transformers.PretrainedConfig) else \
        AutoConfig.from_pretrained(model)
    skeleton = _skeleton(config, model_class)
    modules, param_plan = _experts_plan(skeleton)
    if not modules:
        raise ValueError(f"{type(skeleton).__name__} has no fused experts module "
                         "(use_experts_implementation): nothing to run expert-parallel")
    num_experts = {m.down_proj.size(0) for m in skeleton.modules() if is_fused_experts(m)}
    if any(e % world for e in num_experts):
        raise ValueError(f"the experts ({sorted(num_experts)}) do not split evenly over "
                         f"{world} ranks")
    # The model's TP rules for everything but the routed experts, kept or neutralized. The same
    # dict is the whole plan where an override replaces the model's plan (5.17 - 5.18) and
    # overrides every rule where it is merged into it (5.19+).
    dense_plan = {name: (style if dense == "tp" else REPLICATED_STYLE)
                  for name, style in dict(getattr(skeleton, "tp_plan", None) or {}).items()
                  if not _is_under(name, modules)}
    if mechanism == "auto":
        mechanism = "ep_registry" if has_ep_registry() else "experts_implementation"
    if mechanism == "ep_registry":
        if not has_ep_registry():
            raise RuntimeError(f"transformers {transformers.__version__} has no EP "
                               "implementation registry (added in 5.23): use "
                               "mechanism='experts_implementation'")
        fields = {"tp_size": world, "ep_size": world, "ep_implementation": implementation}
        if dense_plan:
            fields["tp_plan"] = dense_plan
        ep_plan = dict(getattr(skeleton, "ep_plan", None) or {})
        if any(ep_plan.get(m) != "ep_dispatch_experts" for m in modules):
            # the model ships no token-dispatch EP plan: spell one
            fields["ep_plan"] = {**param_plan, **dict.fromkeys(modules, "ep_dispatch_experts")}
        fields.update(distributed_config)
        return {"distributed_config": DistributedConfig(**fields)}
    if mechanism == "experts_implementation":
        plan = {**dense_plan, **param_plan, **dict.fromkeys(modules, MARKER_STYLE)}
        fields = {"tp_size": world, "tp_plan": plan}
        fields.update(distributed_config)
        return {"distributed_config": DistributedConfig(**fields),
                "experts_implementation": implementation}
    raise ValueError(f"mechanism must be 'auto', 'ep_registry' or 'experts_implementation', "
                     f"got {mechanism!r}")


def expert_parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of expert parameters this rank holds, bytes of the whole model's experts)."""
    local = total = 0
    for module in model.modules():
        if not is_fused_experts(module):
            continue
        for name in _expert_param_names(module):
            p = module._parameters[name]
            lp = _local(p)
            local += lp.numel() * lp.element_size()
            total += math.prod(p.shape) * p.element_size()
    return local, total


register(DEFAULT_NAME)
# The experts function registered as "swiftep" (ExpertsInterface signature).
swiftep_experts_forward = _EXPERTS_FORWARDS[DEFAULT_NAME]
