"""Tiny Mixtral and Qwen3-MoE checkpoints served expert-parallel through the Transformers
integration, in bf16, 2 ranks against the unsharded model: logits, greedy generation, expert
bytes per rank, and that every MoE layer went through swiftep dispatch.

    python3 scripts/gpu_transformers_check.py                 # 2 processes sharing cuda:0
    python3 scripts/gpu_transformers_check.py --device cpu    # gloo + the CPU backend

Both modes use a gloo process group (NCCL refuses two ranks on one GPU). With --device cuda both
ranks use cuda:0: LOCAL_RANK is set to 0 in both (it is the GPU index Transformers' distributed
loading calls set_device with and builds its device_map from), so Transformers builds a "cuda"
DeviceMesh over the gloo world group and loads the sharded experts straight onto cuda:0; the
integration then builds its Communicator on cuda (torch symmetric memory, which spans processes
on one GPU with TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torch_swiftep.integrations.transformers_tiny import VOCAB, save_tiny_model  # noqa: E402
from torch_swiftep.launch import WorldError, run_world  # noqa: E402

FAMILIES = ("mixtral", "qwen3_moe")
WORLD = 2
NEW_TOKENS = 16
CUDA_ENV = {"TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0",
            "NVSHMEM_DISABLE_NVLS": "1", "CUDA_MODULE_LOADING": "LAZY"}


def _prompt(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def _generate(model, prompt):
    # min == max new tokens: every rank runs the same number of forwards (no early EOS stop)
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False)


def _first_difference(ref, seq_ref, seq_ep, prompt_len, tol):
    """(position among the new tokens, row, is a near-tie) of the first differing token, or None.
    A near-tie: in the reference model's logits at that step, the EP model's pick trails the
    reference's pick by at most tol * max|logit| (a bf16 rounding flip, not a wrong expert)."""
    differs = (seq_ref != seq_ep).nonzero()
    if differs.numel() == 0:
        return None
    row, col = (int(v) for v in differs[differs[:, 1].argmin()])
    logits = ref(seq_ref[row:row + 1, :col]).logits[0, -1].float()
    gap = (logits[seq_ref[row, col]] - logits[seq_ep[row, col]]).item()
    return col - prompt_len, row, gap <= tol * logits.abs().max().item()


def _check_family(rank, world, family, path, device, mechanism, tol, swiftep_hf):
    from transformers import AutoModelForCausalLM

    dispatches = lambda: sum(c.epochs()[0] for c in swiftep_hf.communicators())  # noqa: E731
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    kwargs = swiftep_hf.expert_parallel_kwargs(path, world_size=world, mechanism=mechanism)
    # the distributed load places the model on the mesh's device (cuda:LOCAL_RANK or cpu)
    ep = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()
    experts = [m for m in ep.modules() if swiftep_hf.is_fused_experts(m)]
    expert_devices = {p.device.type for m in experts for p in m.parameters()}
    prompt = _prompt().to(device)
    before = dispatches()
    with torch.no_grad():
        logits_ref = ref(prompt).logits.float()
        logits_ep = ep(prompt).logits.float()
        rel_diff = ((logits_ep - logits_ref).abs().max() / logits_ref.abs().max()).item()
        seq_ref, seq_ep = _generate(ref, prompt), _generate(ep, prompt)
        difference = _first_difference(ref, seq_ref, seq_ep, prompt.size(1), tol)
    dispatched = dispatches() - before
    local, _ = swiftep_hf.expert_parameter_bytes(ep)
    _, whole = swiftep_hf.expert_parameter_bytes(ref)
    comm_devices = sorted({c.device.type for c in swiftep_hf.communicators()})
    return {"family": family, "rank": rank, "rel_diff": rel_diff, "difference": difference,
            "local": local, "whole": whole, "dispatched": dispatched,
            "needed": len(experts) * (1 + NEW_TOKENS),  # 1 forward + 16 generate steps
            "expert_devices": sorted(expert_devices), "comm_devices": comm_devices,
            "param_dtype": str(experts[0].down_proj.dtype).replace("torch.", "")}


def _rank_main(rank, world, paths, device_type, mechanism, tol):
    # LOCAL_RANK is the GPU this process uses: both ranks share cuda:0
    local_rank = 0 if device_type == "cuda" else rank
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    torch.set_num_threads(1)
    # 5.17: the model's TP rules for dense MLPs that these families do not have
    warnings.filterwarnings("ignore", message="Layer pattern .* does not match any parameters")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    import torch_swiftep.integrations.transformers as swiftep_hf

    device = torch.device(device_type, local_rank) if device_type == "cuda" else \
        torch.device("cpu")
    try:
        return [_check_family(rank, world, family, path, device, mechanism, tol, swiftep_hf)
                for family, path in paths.items()]
    finally:
        swiftep_hf.clear_communicators()


def _problems(r, device_type, world, tol) -> list[str]:
    out = []
    if not r["rel_diff"] <= tol:
        out.append(f"max|logit diff|/max|logit| {r['rel_diff']:.3g} > {tol}")
    if r["difference"] is not None and not r["difference"][2]:
        pos, row, _ = r["difference"]
        out.append(f"greedy tokens differ at new token {pos} (row {row}), not a near-tie")
    if r["local"] * world != r["whole"]:
        out.append(f"rank holds {r['local']} expert bytes, whole model {r['whole']}")
    if r["dispatched"] < r["needed"]:
        out.append(f"{r['dispatched']} swiftep dispatches, expected >= {r['needed']}")
    if r["expert_devices"] != [device_type] or r["comm_devices"] != [device_type]:
        out.append(f"experts on {r['expert_devices']}, communicator on {r['comm_devices']}")
    if r["param_dtype"] != "bfloat16":
        out.append(f"expert parameters are {r['param_dtype']}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--mechanism", default="auto",
                        choices=("auto", "ep_registry", "experts_implementation"))
    parser.add_argument("--tol", type=float, default=2e-2,
                        help="max |logits_ep - logits_ref| relative to max |logits_ref|")
    parser.add_argument("--timeout", type=float, default=115.0, help="seconds for the world")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("transformers GPU check: FAILED (no CUDA device; use --device cpu)")
        return 1
    import transformers
    from transformers.utils import logging

    import torch_swiftep.integrations.transformers as swiftep_hf

    logging.disable_progress_bar()
    start = time.monotonic()
    mechanism = args.mechanism if args.mechanism != "auto" else \
        "ep_registry" if swiftep_hf.has_ep_registry() else "experts_implementation"
    env = CUDA_ENV if args.device == "cuda" else {}
    os.environ.update(env)  # the spawned ranks inherit it too, before CUDA initializes
    with tempfile.TemporaryDirectory(prefix="swiftep_tiny_") as root:
        paths = {f: save_tiny_model(f, os.path.join(root, f), seed=i)
                 for i, f in enumerate(FAMILIES)}
        try:
            per_rank = run_world(WORLD, _rank_main, paths, args.device, mechanism, args.tol,
                                 backend="gloo", env=env, timeout_s=args.timeout,
                                 group_timeout_s=min(60.0, args.timeout))
        except WorldError as exc:
            print(f"{exc}\ntransformers GPU check: FAILED ({time.monotonic() - start:.1f} s)")
            return 1
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {WORLD} ranks "
          f"on {args.device} over gloo, bf16, mechanism "
          f"{mechanism}")
    print(f"{'family':<10} {'rank':>4} {'rel_diff':>9} {'greedy16':>15} {'expert_KiB':>14} "
          f"{'dispatches':>10} {'comm':>5}  status")
    failed = False
    for results in per_rank:
        for r in results:
            problems = _problems(r, args.device, WORLD, args.tol)
            failed |= bool(problems)
            d = r["difference"]
            greedy = "equal" if d is None else f"tie@{d[0]}" if d[2] else f"DIFF@{d[0]}"
            kib = f"{r['local'] / 1024:g}/{r['whole'] / 1024:g}"
            print(f"{r['family']:<10} {r['rank']:>4} {r['rel_diff']:>9.2e} {greedy:>15} "
                  f"{kib:>14} {r['dispatched']:>10} {','.join(r['comm_devices']):>5}  "
                  f"{'ok' if not problems else '; '.join(problems)}")
    elapsed = time.monotonic() - start
    print(f"transformers GPU check: {'FAILED' if failed else 'passed'} ({elapsed:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
