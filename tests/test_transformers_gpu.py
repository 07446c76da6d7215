"""The Transformers integration on a GPU: tiny Mixtral and Qwen3-MoE checkpoints served
expert-parallel in bf16 by 2 ranks sharing one GPU, against the unsharded model: logits, greedy
generation, expert bytes per rank, and that every MoE layer went through swiftep dispatch.

Both ranks use cuda:0 over a gloo process group (NCCL refuses two ranks on one GPU). LOCAL_RANK
is 0 in both (it is the GPU index Transformers' distributed loading calls set_device with and
builds its device_map from), so Transformers builds a "cuda" DeviceMesh over the gloo world group
and loads the sharded experts straight onto cuda:0; the integration then builds its Communicator
on cuda (torch symmetric memory, which spans processes on one GPU with
TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1). The CPU side of the integration:
test_transformers_integration.py.
"""
import os
import warnings

import pytest
import torch
from gpu_world import ENV, GPU_MARKS

from torch_swiftep.launch import run_world

pytestmark = GPU_MARKS + [pytest.mark.slow]
pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' distributed loading needs accelerate")

FAMILIES = ("mixtral", "qwen3_moe")
WORLD = 2
NEW_TOKENS = 16
TOL = 2e-2  # max |logits_ep - logits_ref| relative to max |logits_ref| (bf16)


def _prompt(batch: int = 2, length: int = 8) -> torch.Tensor:
    from torch_swiftep.integrations.transformers_tiny import VOCAB

    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def _generate(model, prompt):
    # min == max new tokens: every rank runs the same number of forwards (no early EOS stop)
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False)


def _first_difference(ref, seq_ref, seq_ep, prompt_len):
    """(position among the new tokens, row, is a near-tie) of the first differing token, or None.
    A near-tie: in the reference model's logits at that step, the EP model's pick trails the
    reference's pick by at most TOL * max|logit| (a bf16 rounding flip, not a wrong expert)."""
    differs = (seq_ref != seq_ep).nonzero()
    if differs.numel() == 0:
        return None
    row, col = (int(v) for v in differs[differs[:, 1].argmin()])
    logits = ref(seq_ref[row:row + 1, :col]).logits[0, -1].float()
    gap = (logits[seq_ref[row, col]] - logits[seq_ep[row, col]]).item()
    return col - prompt_len, row, gap <= TOL * logits.abs().max().item()


def _check_family(rank, world, path, mechanism, swiftep_hf) -> dict:
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda", 0)
    dispatches = lambda: sum(c.epochs()[0] for c in swiftep_hf.communicators())  # noqa: E731
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    kwargs = swiftep_hf.expert_parallel_kwargs(path, world_size=world, mechanism=mechanism)
    # the distributed load places the model on the mesh's device (cuda:LOCAL_RANK)
    ep = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()
    experts = [m for m in ep.modules() if swiftep_hf.is_fused_experts(m)]
    prompt = _prompt().to(device)
    before = dispatches()
    with torch.no_grad():
        logits_ref = ref(prompt).logits.float()
        logits_ep = ep(prompt).logits.float()
        rel_diff = ((logits_ep - logits_ref).abs().max() / logits_ref.abs().max()).item()
        seq_ref, seq_ep = _generate(ref, prompt), _generate(ep, prompt)
        difference = _first_difference(ref, seq_ref, seq_ep, prompt.size(1))
    local, _ = swiftep_hf.expert_parameter_bytes(ep)
    _, whole = swiftep_hf.expert_parameter_bytes(ref)
    return {"rel_diff": rel_diff, "difference": difference, "local": local, "whole": whole,
            "dispatched": dispatches() - before,
            "needed": len(experts) * (1 + NEW_TOKENS),  # 1 forward + 16 generate steps
            "expert_devices": sorted({p.device.type for m in experts for p in m.parameters()}),
            "comm_devices": sorted({c.device.type for c in swiftep_hf.communicators()}),
            "param_dtype": str(experts[0].down_proj.dtype).replace("torch.", "")}


def _rank_main(rank, world, paths, mechanism):
    # LOCAL_RANK is the GPU this process uses: both ranks share cuda:0
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world))
    torch.cuda.set_device(0)
    torch.set_num_threads(1)
    # the model's TP rules for dense MLPs that these families do not have
    warnings.filterwarnings("ignore", message="Layer pattern .* does not match any parameters")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    import torch_swiftep.integrations.transformers as swiftep_hf

    try:
        return {family: _check_family(rank, world, path, mechanism, swiftep_hf)
                for family, path in paths.items()}
    finally:
        swiftep_hf.clear_communicators()


def _problems(r) -> list[str]:
    out = []
    if not r["rel_diff"] <= TOL:
        out.append(f"max|logit diff|/max|logit| {r['rel_diff']:.3g} > {TOL}")
    if r["difference"] is not None and not r["difference"][2]:
        pos, row, _ = r["difference"]
        out.append(f"greedy tokens differ at new token {pos} (row {row}), not a near-tie")
    if r["local"] * WORLD != r["whole"]:
        out.append(f"rank holds {r['local']} expert bytes, whole model {r['whole']}")
    if r["dispatched"] < r["needed"]:
        out.append(f"{r['dispatched']} swiftep dispatches, expected >= {r['needed']}")
    if r["expert_devices"] != ["cuda"] or r["comm_devices"] != ["cuda"]:
        out.append(f"experts on {r['expert_devices']}, communicator on {r['comm_devices']}")
    if r["param_dtype"] != "bfloat16":
        out.append(f"expert parameters are {r['param_dtype']}")
    return out


def test_tiny_moe_served_expert_parallel_on_one_gpu(tmp_path, monkeypatch):
    import torch_swiftep.integrations.transformers as swiftep_hf
    from torch_swiftep.integrations.transformers_tiny import save_tiny_model

    mechanism = "ep_registry" if swiftep_hf.has_ep_registry() else "experts_implementation"
    for key, value in ENV.items():  # the spawned ranks see it before CUDA initializes
        monkeypatch.setenv(key, value)
    paths = {f: save_tiny_model(f, tmp_path / f, seed=i) for i, f in enumerate(FAMILIES)}
    per_rank = run_world(WORLD, _rank_main, paths, mechanism, env=ENV, timeout_s=115,
                         group_timeout_s=60)
    problems = [f"rank {rank} {family} ({mechanism}): {p}"
                for rank, results in enumerate(per_rank)
                for family, r in results.items() for p in _problems(r)]
    assert not problems, "\n".join(problems)
