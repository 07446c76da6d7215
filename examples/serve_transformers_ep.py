"""Serve a Transformers MoE model expert-parallel through swiftep, and compare it with the same
checkpoint loaded whole.

    torchrun --nproc-per-node 2 examples/serve_transformers_ep.py --family mixtral
    torchrun --nproc-per-node 4 examples/serve_transformers_ep.py --family gpt_oss --dense tp
    torchrun --nproc-per-node 8 examples/serve_transformers_ep.py --model /path/to/checkpoint \\
        --dtype bfloat16 --no-reference

Without --model, rank 0 builds a tiny random checkpoint of --family offline (hidden 32, 2 layers,
8 experts; no download) and every rank loads it. On a machine without CUDA the ranks talk over
gloo and swiftep runs its CPU backend; with CUDA, over NCCL with the compiled extension.

Rank 0 prints: the Transformers mechanism used, the max logit difference against the whole
model, whether greedy generation gives the same tokens, and the expert parameter bytes each
rank holds against the whole model's.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist


def parse_args():
    from torch_swiftep.integrations.transformers_tiny import FAMILIES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=FAMILIES, default="mixtral",
                   help="tiny model family to build (ignored with --model)")
    p.add_argument("--model", help="a checkpoint path or hub id instead of a tiny model")
    p.add_argument("--mechanism", default="auto",
                   choices=("auto", "ep_registry", "experts_implementation"))
    p.add_argument("--dense", default="replicated", choices=("replicated", "tp"),
                   help="keep attention/shared experts whole on every rank, or tensor-parallel")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--max-tokens-per-rank", type=int, default=4096)
    p.add_argument("--no-reference", action="store_true",
                   help="skip the whole-model comparison (it loads the full model on rank 0)")
    return p.parse_args()


def checkpoint_path(args, rank: int):
    """A path every rank can read: --model, or a tiny model rank 0 saves (and its temp dir)."""
    if args.model is not None:
        return args.model, None
    from torch_swiftep.integrations.transformers_tiny import save_tiny_model

    tmp, path = None, [None]
    if rank == 0:
        tmp = tempfile.TemporaryDirectory(prefix=f"tiny_{args.family}_")
        path = [save_tiny_model(args.family, tmp.name)]
    dist.broadcast_object_list(path, src=0)
    return path[0], tmp


def compare_with_whole_model(args, path, dtype, prompt, logits, tokens, gen_kwargs) -> str:
    """Rank 0: the unsharded model on the same prompt (logits and greedy tokens)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(prompt.device).eval()
    with torch.no_grad():
        ref_logits = ref(prompt).logits.float()
        ref_tokens = ref.generate(prompt, **gen_kwargs)
    diff = (logits - ref_logits).abs().max().item()
    same = torch.equal(tokens, ref_tokens)
    return f"max |logit diff| vs whole model: {diff:.3g}   greedy {args.new_tokens} tokens " \
           f"equal: {same}"


def report(args, world, device, kwargs, ref_line, per_rank, total_bytes, tokens, load_s, gen_s):
    import transformers

    what = kwargs.get("experts_implementation")
    mechanism = (f"experts_implementation={what!r}" if what else
                 f"DistributedConfig(ep_implementation="
                 f"{kwargs['distributed_config'].ep_implementation!r})")
    print(f"transformers {transformers.__version__}, {world} ranks on {device.type}, "
          f"model {args.model or args.family} ({args.dtype}), {mechanism}, "
          f"dense layers {args.dense}")
    print(ref_line)
    shares = ", ".join(f"{b / 2**10:.1f}" for b in per_rank)
    print(f"expert parameter KiB per rank: [{shares}] of {total_bytes / 2**10:.1f} whole "
          f"(1/{total_bytes / max(per_rank):.0f} each)")
    print(f"generated tokens (rank 0, sequence 0): {tokens[0, args.prompt_len:].tolist()}")
    print(f"load {load_s:.2f}s, generate {gen_s:.2f}s")


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    import torch_swiftep.integrations.transformers as swiftep_hf

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    swiftep_hf.register("swiftep", max_tokens_per_rank=args.max_tokens_per_rank)
    dtype = getattr(torch, args.dtype)
    path, tmp = checkpoint_path(args, rank)

    # expert-parallel load: each rank reads only its experts' slices
    kwargs = swiftep_hf.expert_parallel_kwargs(path, world_size=world, mechanism=args.mechanism,
                                               dense=args.dense)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    load_s = time.perf_counter() - t0
    device = next(model.parameters()).device
    prompt = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(device)
    gen_kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
                  "do_sample": False}
    with torch.no_grad():
        logits = model(prompt).logits.float()
        t0 = time.perf_counter()
        tokens = model.generate(prompt, **gen_kwargs)
        gen_s = time.perf_counter() - t0
    local_bytes, total_bytes = swiftep_hf.expert_parameter_bytes(model)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, local_bytes)

    if rank == 0:
        ref_line = ("whole-model comparison skipped (--no-reference)" if args.no_reference else
                    compare_with_whole_model(args, path, dtype, prompt, logits, tokens,
                                             gen_kwargs))
        report(args, world, device, kwargs, ref_line, per_rank, total_bytes, tokens, load_s,
               gen_s)
    swiftep_hf.clear_communicators()
    dist.barrier()
    if tmp is not None:
        tmp.cleanup()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
