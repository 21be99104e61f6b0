"""Train the CPU fixture: a tiny byte-level Llama with a short (128-token) window.

LongRoPE's claims are about a model *trained short* and run long without fine-tuning. A random
model has no length generalisation to measure, and SmolLM2 at 16k is minutes per forward on a CPU,
so this script trains a small real one in minutes on one core, reproducibly:

    python -m factors.tiny_short --out factors/data/tiny-short/model

Byte-level (vocab 256, token = UTF-8 byte), 4 layers, hidden 128, 2 heads (head_dim 64, which vLLM's
CPU attention accepts), RoPE base 10000, trained on the ``train`` split of the Python standard
library's source (see factors.corpus). Fixed seeds, deterministic algorithms, one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .byte_tokenizer import write_byte_tokenizer
from .corpus import stdlib_text

DEFAULT_OUT = Path(__file__).parent / "data" / "tiny-short" / "model"


def tiny_config(context: int = 128, layers: int = 4, hidden: int = 128, heads: int = 2) -> dict:
    """The HF LlamaConfig fields of the fixture (head_dim = hidden / heads = 64)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": "float32",
    }


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes as token ids (int64)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)


@torch.no_grad()
def window_ppl(model: torch.nn.Module, tokens: torch.Tensor, context: int, samples: int, seed: int) -> float:
    """Perplexity over `samples` random windows of `context` tokens (the in-window number)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - context - 1, (samples,), generator=g)
    batch = torch.stack([tokens[s : s + context] for s in starts.tolist()])
    out = model(input_ids=batch, labels=batch)
    return math.exp(float(out.loss))


def train(
    out: Path,
    *,
    steps: int = 1500,
    batch: int = 32,
    context: int = 128,
    lr: float = 3e-3,
    warmup: int = 100,
    seed: int = 0,
    threads: int = 1,
    log_every: int = 100,
) -> dict:
    """Train and save the HF model folder; returns the metrics also written to training.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    tokens = byte_tokens(stdlib_text("train"))
    heldout = byte_tokens(stdlib_text("heldout"))
    cfg = LlamaConfig(**{k: v for k, v in tiny_config(context).items() if k not in ("architectures", "model_type")})
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.monotonic()
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, tokens.numel() - context - 1, (batch,), generator=g)
        x = torch.stack([tokens[s : s + context] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss_value:.4f}  {time.monotonic() - t0:6.1f}s", file=sys.stderr, flush=True)
    seconds = time.monotonic() - t0
    model.eval()
    ppl = window_ppl(model, heldout, context, samples=64, seed=1234)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    write_byte_tokenizer(out)  # so vLLM and transformers take text prompts (ids = bytes, as here)
    metrics = {
        "steps": steps,
        "batch": batch,
        "context": context,
        "lr": lr,
        "seed": seed,
        "threads": threads,
        "train_seconds": round(seconds, 1),
        "final_train_loss": round(loss_value, 4),
        "in_window_ppl_heldout": round(ppl, 4),
        "train_bytes": int(tokens.numel()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "command": f"python -m factors.tiny_short --out {out} --steps {steps} --batch {batch} --seed {seed}",
    }
    (out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m factors.tiny_short",
        description="Train the tiny byte-level Llama (context 128) used as the CPU fixture for factor search.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="HF model folder to write (default: the shipped one)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--context", type=int, default=128, help="training window in bytes (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and batches (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible)")
    args = p.parse_args(argv)
    metrics = train(
        args.out,
        steps=args.steps,
        batch=args.batch,
        context=args.context,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
    )
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
