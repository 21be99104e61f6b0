"""Tiny, deterministic random models for engine tests (2 layers; long prompts stay cheap)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ROTARY_DIM = 64  # head_dim of every tiny model here: 32 frequency pairs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# 2 layers, hidden 128, 2 heads → head_dim 64 (the CPU attention's smallest supported size), fp32,
# the SmolLM2 tokenizer's vocabulary.
TINY = {
    "vocab_size": 49152,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "dtype": "float32",
}


def _save(model: Any, folder: Path, tokenizer_dir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def make_tiny_llama(folder: Path, tokenizer_dir: Path, *, max_position_embeddings: int = 256, seed: int = 0) -> Path:
    """Llama, 2 layers, hidden 128, 2 heads (head_dim 64 → 32 frequency pairs), fp32, SmolLM2 tokenizer."""
    return make_tiny_model(folder, tokenizer_dir, "llama", max_position_embeddings=max_position_embeddings, seed=seed)


FAMILIES = ("llama", "mistral", "qwen2")  # the plain-RoPE families LongRoPE sets are published for or applied to


def make_tiny_model(
    folder: Path, tokenizer_dir: Path, family: str, *, max_position_embeddings: int = 256, seed: int = 0
) -> Path:
    """A tiny random model of one family (same sizes as :func:`make_tiny_llama`): Mistral without sliding
    window, Qwen2 with its q/k/v biases (set non-zero so they matter). In both, q/k weights are scaled ×6 so
    that attention, and with it the rotary factors, changes the outputs (see :func:`make_tiny_phi3`)."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = {**TINY, "max_position_embeddings": max_position_embeddings, "rope_theta": 10000.0}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None, tie_word_embeddings=True))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False, tie_word_embeddings=True))
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    with torch.no_grad():  # larger logits spread so greedy ties are unlikely
        model.model.embed_tokens.weight.normal_(0, 0.5)
        for layer in model.model.layers if family != "llama" else []:
            layer.self_attn.q_proj.weight *= 6.0
            layer.self_attn.k_proj.weight *= 6.0
            if family == "qwen2":
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return _save(model, folder, tokenizer_dir)


def make_tiny_phi3(
    folder: Path,
    tokenizer_dir: Path,
    *,
    original: int = 128,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    qk_scale: float = 6.0,
) -> Path:
    """Phi-3-style model with a ``longrope`` config (short + long factors), 2 layers, fp32.

    Query and key weights are scaled by ``qk_scale`` so attention is sharp enough for the rotary factors to
    change greedy tokens (at the default init a random 2-layer model's next token barely depends on
    positions: short and long factors gave the same 28 greedy tokens; ×6 changed 26 of 28)."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    head_dim = 64
    short = [1.0 + 0.05 * i for i in range(head_dim // 2)]
    long = [1.0 + 1.5 * i for i in range(head_dim // 2)]
    cfg = Phi3Config(
        **TINY,
        max_position_embeddings=max_position_embeddings,
        original_max_position_embeddings=original,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": short,
            "long_factor": long,
            "original_max_position_embeddings": original,
        },
    )
    model = Phi3ForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.5)
        q_and_k = (cfg.num_attention_heads + cfg.num_key_value_heads) * head_dim  # qkv_proj rows: q, k, v
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight[:q_and_k] *= qk_scale
    return _save(model, folder, tokenizer_dir)


def write_set(folder: Path, name: str, factors: list[float], max_len: int, **extra: object) -> Path:
    """A factor-set file for the tiny models (rotary_dim 64, RoPE base 10000, original window 256)."""
    path = folder / f"{name}.json"
    body = {"name": name, "factors": factors, "rope_theta": 10000.0, "rotary_dim": ROTARY_DIM}
    path.write_text(json.dumps({**body, "original_max_len": 256, "max_len": max_len, **extra}))
    return path
