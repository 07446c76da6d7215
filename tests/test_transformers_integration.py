"""The Transformers integration: tiny random MoE checkpoints of five families, loaded
expert-parallel over gloo ranks (world sizes 2 and 4), against the same checkpoint loaded whole.

For each family and each mechanism the installed transformers offers (the EP implementation
registry on >= 5.23, the experts-implementation hook on every supported version): logits match
the unsharded model in fp32, greedy generation of 16 tokens is identical, and each rank holds
1/W of the expert parameter bytes (the right experts). One process group per world size runs
every case; the checkpoints are written once by the parent.
"""
import os

import pytest
import torch

from torch_swiftep.integrations.transformers_tiny import FAMILIES, VOCAB, save_tiny_model
from torch_swiftep.launch import run_world

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' distributed loading needs accelerate")
swiftep_hf = pytest.importorskip("torch_swiftep.integrations.transformers")

NEW_TOKENS = 16
LOGIT_ATOL = 1e-4


def _mechanisms():
    return (["ep_registry"] if swiftep_hf.has_ep_registry() else []) + ["experts_implementation"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_moe")
    return {fam: save_tiny_model(fam, root / fam, seed=i) for i, fam in enumerate(FAMILIES)}


def _prompt(seed: int, batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, prompt):
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False)


def _experts_modules(model):
    return [(n, m) for n, m in model.named_modules() if swiftep_hf.is_fused_experts(m)]


def _dispatches() -> int:
    return sum(comm.epochs()[0] for comm in swiftep_hf.communicators())


def _compare(rank, world, ep, ref, prompt) -> dict:
    """What the parent asserts on, computed on this rank."""
    before = _dispatches()
    with torch.no_grad():
        diff = (ep(prompt).logits - ref(prompt).logits).abs().max().item()
        same_tokens = torch.equal(_generate(ep, prompt), _generate(ref, prompt))
    # every MoE layer of the 1 + NEW_TOKENS forwards went through swiftep dispatch
    moe_layers = len(_experts_modules(ep))
    dispatched = _dispatches() - before >= moe_layers * (1 + NEW_TOKENS)
    local, total = swiftep_hf.expert_parameter_bytes(ep)
    ref_local, ref_total = swiftep_hf.expert_parameter_bytes(ref)
    # the right experts: this rank's slice of every expert parameter of the whole model
    right_experts = True
    ref_modules = dict(_experts_modules(ref))
    for name, module in _experts_modules(ep):
        for p_name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias",
                       "down_proj_bias"):
            p = module._parameters.get(p_name)
            if p is None:
                continue
            whole = ref_modules[name]._parameters[p_name]
            lp = p.to_local() if hasattr(p, "to_local") else p
            per = whole.size(0) // world
            right_experts &= torch.equal(lp, whole[rank * per:(rank + 1) * per])
    # shared experts (DeepSeek-V3) stay whole and replicated
    shared = {n: p for n, p in ep.named_parameters() if ".shared_experts." in n}
    ref_shared = dict(ref.named_parameters())
    shared_whole = all(not hasattr(p, "to_local") and torch.equal(p, ref_shared[n])
                       for n, p in shared.items())
    return {"diff": diff, "same_tokens": same_tokens, "dispatched": dispatched, "local": local,
            "total": total, "ref_total": ref_total, "ref_local": ref_local,
            "right_experts": right_experts, "shared": len(shared), "shared_whole": shared_whole}


def _serve_all(rank, world, checkpoints, mechanisms):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    results = {}
    for family, path in checkpoints.items():
        ref = AutoModelForCausalLM.from_pretrained(path).eval()
        for mechanism in mechanisms:
            kwargs = swiftep_hf.expert_parallel_kwargs(path, world_size=world,
                                                       mechanism=mechanism)
            ep = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
            results[(family, mechanism, "replicated")] = _compare(rank, world, ep, ref,
                                                                  _prompt(7))
        if family in ("deepseek_v3", "olmoe", "mixtral"):
            # dense layers (attention, shared experts, dense MLPs) tensor-parallel as well
            kwargs = swiftep_hf.expert_parallel_kwargs(path, world_size=world, dense="tp")
            ep = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
            results[(family, mechanisms[0], "dense_tp")] = _compare(rank, world, ep, ref,
                                                                    _prompt(8))
        del ref
    if "ep_registry" in mechanisms:
        # every rank serves its own batch (dense layers FSDP-sharded): tokens really cross ranks
        for family in ("mixtral", "gpt_oss"):
            path = checkpoints[family]
            ref = AutoModelForCausalLM.from_pretrained(path).eval()
            kwargs = swiftep_hf.expert_parallel_kwargs(path, world_size=world, tp_size=1,
                                                       fsdp_size=world)
            ep = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
            results[(family, "ep_registry", "own_batch")] = _compare(
                rank, world, ep, ref, _prompt(100 + rank, batch=1 + rank % 2))
    # a forward past max_tokens_per_rank fails clearly, on every rank
    swiftep_hf.register("swiftep_small", max_tokens_per_rank=4)
    path = checkpoints["mixtral"]
    kwargs = swiftep_hf.expert_parallel_kwargs(path, world_size=world,
                                               implementation="swiftep_small")
    small = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    with torch.no_grad():
        small(_prompt(1, batch=1, length=4 * world))  # exactly at the limit
        try:
            small(_prompt(1, batch=2, length=4 * world))
            results["limit_error"] = None
        except ValueError as exc:
            results["limit_error"] = str(exc)
    swiftep_hf.clear_communicators()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_families_expert_parallel(world, checkpoints):
    mechanisms = _mechanisms()
    per_rank = run_world(world, _serve_all, checkpoints, mechanisms, timeout_s=420,
                         group_timeout_s=120)
    problems = []
    for rank, results in enumerate(per_rank):
        error = results.pop("limit_error")
        if error is None or "max_tokens_per_rank=4" not in error:
            problems.append(f"rank {rank}: no clear max_tokens_per_rank error: {error!r}")
        for (family, mechanism, batch), r in sorted(results.items()):
            tag = f"rank {rank} {family} {mechanism} {batch}"
            if not r["diff"] <= LOGIT_ATOL:
                problems.append(f"{tag}: max logit diff {r['diff']:.3g}")
            if not r["same_tokens"]:
                problems.append(f"{tag}: greedy tokens differ")
            if not r["dispatched"]:
                problems.append(f"{tag}: the MoE layers did not go through swiftep dispatch")
            if r["ref_local"] != r["ref_total"] or r["total"] != r["ref_total"]:
                problems.append(f"{tag}: expert bytes {r['total']} vs whole {r['ref_total']}")
            if r["local"] * world != r["ref_total"]:
                problems.append(f"{tag}: rank holds {r['local']} expert bytes, whole model "
                                f"{r['ref_total']}, world {world}")
            if not r["right_experts"]:
                problems.append(f"{tag}: local expert weights are not this rank's slice")
            if family == "deepseek_v3" and batch == "replicated" and \
                    not (r["shared"] and r["shared_whole"]):
                problems.append(f"{tag}: shared experts not kept whole ({r['shared']})")
        expected = {(f, m, "replicated") for f in FAMILIES for m in mechanisms}
        missing = expected - set(results)
        if missing:
            problems.append(f"rank {rank}: cases not run: {sorted(missing)}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------- single process (fast)
@pytest.mark.parametrize("compute", ["loop", "grouped_mm"])
def test_world_of_one_matches_whole_model(compute, checkpoints):
    """``experts_implementation=<swiftep>`` without a distributed config: all experts local,
    routed through a world-of-one communicator; same logits as Transformers' own experts."""
    from transformers import AutoModelForCausalLM

    if compute == "grouped_mm" and swiftep_hf._grouped_mm_fn() is None:
        pytest.skip("this torch has no grouped_mm")
    name = f"swiftep_test_{compute}"
    swiftep_hf.register(name, experts_compute=compute)
    for family, path in checkpoints.items():
        ref = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
        one = AutoModelForCausalLM.from_pretrained(path, experts_implementation=name).eval()
        prompt = _prompt(3)
        with torch.no_grad():
            diff = (one(prompt).logits - ref(prompt).logits).abs().max().item()
        assert diff <= LOGIT_ATOL, f"{family}: {diff}"


def test_compiled_model_matches_whole_model(checkpoints):
    """torch.compile of a model served through the integration (one family, world of one):
    inside the compiled region the experts write a fresh tensor, not the combine window
    (Communicator.combine_buffer refuses compilation), and the logits still match."""
    from transformers import AutoModelForCausalLM

    swiftep_hf.register("swiftep_test_compiled", experts_compute="loop")
    family = FAMILIES[0]
    path = checkpoints[family]
    ref = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    one = AutoModelForCausalLM.from_pretrained(
        path, experts_implementation="swiftep_test_compiled").eval()
    prompt = _prompt(4)
    torch._dynamo.reset()
    with torch.no_grad():
        diff = (torch.compile(one)(prompt).logits - ref(prompt).logits).abs().max().item()
    assert diff <= LOGIT_ATOL, f"{family}: {diff}"


def test_grad_mode_raises(checkpoints):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoints["mixtral"],
                                                 experts_implementation="swiftep")
    with pytest.raises(RuntimeError, match="inference-only"):
        model(_prompt(0))


def test_kwargs_errors(checkpoints):
    with pytest.raises(ValueError, match="do not split evenly"):
        swiftep_hf.expert_parallel_kwargs(checkpoints["mixtral"], world_size=3)
    with pytest.raises(KeyError, match="no swiftep implementation"):
        swiftep_hf.expert_parallel_kwargs(checkpoints["mixtral"], world_size=2,
                                          implementation="nope")
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        swiftep_hf.SwiftepMoEConfig(max_tokens_per_rank=0)


def test_kwargs_spell_the_plan(checkpoints):
    kwargs = swiftep_hf.expert_parallel_kwargs(checkpoints["gpt_oss"], world_size=2,
                                               mechanism="experts_implementation")
    assert kwargs["experts_implementation"] == "swiftep"
    plan = kwargs["distributed_config"].tp_plan
    assert plan["model.layers.*.mlp.experts"] == swiftep_hf.MARKER_STYLE
    for p in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
        assert plan[f"model.layers.*.mlp.experts.{p}"] == "grouped_gemm"
    if swiftep_hf.has_ep_registry():
        dc = swiftep_hf.expert_parallel_kwargs(checkpoints["gpt_oss"],
                                               world_size=2)["distributed_config"]
        assert (dc.ep_implementation, dc.ep_size, dc.tp_size) == ("swiftep", 2, 2)


def test_settings_reach_the_communicator():
    from torch_swiftep.integrations import _hf_moe

    settings = swiftep_hf.SwiftepMoEConfig(max_tokens_per_rank=8, dispatch_fanout=True)
    comm = _hf_moe._communicator(None, hidden=64, num_experts=4, top_k=2, dtype=torch.float32,
                                 device=torch.device("cpu"), settings=settings)
    assert comm.config.dispatch_fanout and comm.config.max_tokens_per_rank == 8
    swiftep_hf.clear_communicators()
