"""Tiny random MoE checkpoints of the families the Transformers integration supports, built
offline (no download): for the tests and examples/serve_transformers_ep.py.

    path = save_tiny_model("gpt_oss", tmpdir)      # config -> random weights -> save_pretrained
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import torch

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss")

NUM_EXPERTS = 8
VOCAB = 128

# 8 query / 4 key-value heads: dense="tp" (attention tensor-parallel) works up to 4 ranks
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "initializer_range": 0.05,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

_FAMILY_KWARGS = {
    "mixtral": (
        "MixtralConfig",
        {"intermediate_size": 64, "num_local_experts": NUM_EXPERTS, "num_experts_per_tok": 2},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            "intermediate_size": 64,
            "moe_intermediate_size": 32,
            "num_experts": NUM_EXPERTS,
            "num_experts_per_tok": 2,
            "head_dim": 8,
            "norm_topk_prob": True,
        },
    ),
    # group-limited routing (2 groups, 1 picked), one shared expert, layer 0 dense
    "deepseek_v3": (
        "DeepseekV3Config",
        {
            "intermediate_size": 64,
            "moe_intermediate_size": 32,
            "n_routed_experts": NUM_EXPERTS,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "num_key_value_heads": 8,
            "routed_scaling_factor": 2.5,
        },
    ),
    "olmoe": (
        "OlmoeConfig",
        {"intermediate_size": 32, "num_experts": NUM_EXPERTS, "num_experts_per_tok": 2},
    ),
    # biases, interleaved gate/up, clamped SwiGLU: a small limit so the clamp really bites
    "gpt_oss": (
        "GptOssConfig",
        {
            "intermediate_size": 32,
            "num_local_experts": NUM_EXPERTS,
            "num_experts_per_tok": 2,
            "head_dim": 8,
            "sliding_window": 8,
            "swiglu_limit": 0.25,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
}


def tiny_config(family: str, **overrides):
    """A tiny config of ``family`` (hidden 32, 2 layers, 8 experts, top-2, vocab 128)."""
    import transformers

    if family not in _FAMILY_KWARGS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    cls_name, kwargs = _FAMILY_KWARGS[family]
    return getattr(transformers, cls_name)(**{**_COMMON, **kwargs, **overrides})


def tiny_model(family: str, seed: int = 0, **overrides):
    """A randomly initialized tiny causal LM of ``family`` (float32, eval mode). Expert biases
    and routing-correction biases, which the initializers leave at zero, get random values so
    the tests see them."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("_proj_bias", "e_score_correction_bias", "router.bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return model.eval()


def save_tiny_model(family: str, path, seed: int = 0, **overrides) -> str:
    """Build ``tiny_model(family, seed)`` and ``save_pretrained`` it to ``path``; returns path."""
    tiny_model(family, seed, **overrides).save_pretrained(path)
    return str(path)
