"""Run a real LongRopeEngine (vLLM CPU build) from synchronous tests, plus an independent reference."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import torch

ENGINE_KWARGS = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 8, "enable_prefix_caching": True}


@contextlib.contextmanager
def scoped_env(**values: str) -> Iterator[None]:
    """Set environment variables for an engine's start only (its processes read them then), restore after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ids_of(n: int, seed: int) -> list[int]:
    """A deterministic prompt of exactly n random token ids."""
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


class LoopThread:
    """An asyncio loop in a thread: vLLM's AsyncLLM lives there; tests submit coroutines to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def collect(
    engine: Any,
    ids: list[int],
    request_id: str,
    max_tokens: int | None,
    prompt_logprobs: bool = True,
    policy: str | None = None,
    **kw: Any,
) -> Any:
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        prompt_logprobs=0 if prompt_logprobs else None,
        extra_args={"longrope_policy": policy} if policy else None,
    )
    final = None
    async for out in engine.generate({"prompt_token_ids": ids}, params, request_id, **kw):
        final = out
    return final


def prompt_logprob_list(output: Any, ids: list[int]) -> list[float]:
    """Logprob of each actual prompt token from position 1 on (vLLM gives None at position 0)."""
    return [output.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]


def longrope_cos_sin(
    position_ids: torch.Tensor, factors: list[float], n_hat: int, mscale: float, theta: float, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch LongRoPE (written here, independent of factors/rope.py): float64 angles,
    positions < n̂ with the original frequencies, cos/sin × mscale, HF layout [b, seq, dim]."""
    idx = torch.arange(0, dim, 2, dtype=torch.float64)
    original = theta ** (-idx / dim)
    scaled = original / torch.tensor(factors, dtype=torch.float64)
    pos = position_ids.to(torch.float64).unsqueeze(-1)
    freqs = torch.where(pos < n_hat, pos * original, pos * scaled)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * mscale).float(), (emb.sin() * mscale).float()


class TorchReference:
    """HF transformers' Llama forward with the rotary embedding replaced by plain-torch LongRoPE."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        self.model.eval()
        cfg = self.model.config
        self.theta = float(cfg.rope_parameters["rope_theta"])
        self.dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def _use(self, factors: list[float], n_hat: int, mscale: float) -> None:
        rotary = self.model.model.rotary_emb

        def forward(
            x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kw: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = longrope_cos_sin(position_ids, factors, n_hat, mscale, self.theta, self.dim)
            return cos.to(x.dtype), sin.to(x.dtype)

        rotary.forward = forward

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], factors: list[float], n_hat: int, mscale: float) -> list[float]:
        self._use(factors, n_hat, mscale)
        logits = self.model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int, factors: list[float], n_hat: int, mscale: float) -> list[int]:
        self._use(factors, n_hat, mscale)
        seq = list(ids)
        for _ in range(n):
            logits = self.model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
        return seq[len(ids) :]


def max_logprob_error(got: list[float], ref: list[float]) -> float:
    """Largest |Δ| in units of the fp32 tolerance 1e-5 + 1e-6·|ref| (≤ 1 passes).

    Random tiny models give logprobs around -60, where one fp32 ulp is already 7.6e-6, so the
    tolerance scales with the value (measured differences are 1e-5 to 3e-5 there)."""
    return max(abs(a - b) / (1e-5 + 1e-6 * abs(b)) for a, b in zip(got, ref, strict=True))
