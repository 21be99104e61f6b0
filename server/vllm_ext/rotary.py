"""The rotary module every layer of a served model shares, computing each step's rows exactly.

:class:`StepRotaryEmbedding` wraps the model's own rotary module (vLLM's ``RotaryEmbedding`` or a subclass)
and keeps its kernel: vLLM rotates q/k by ``cos_sin_cache[rows]``. Here that cache is a persistent
``[max_num_tokens, rotary_dim]`` buffer holding the cos/sin of the tokens scheduled in the current step
(row t = token t), filled once per step by :meth:`fill` from each token's position and its request's set
(:class:`factors.rope.StepRope`), and ``rows`` is a fixed ``arange``. Memory and a hot-load no longer depend
on any set's window. Shapes and addresses never change, so torch.compile and CUDA graphs see the same
buffers every step; the fill runs before the forward, outside any captured region.
"""

from __future__ import annotations

from typing import Any

import torch

from factors.rope import StepRope
from factors.schema import FactorSet


class StepRotaryEmbedding(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, max_num_tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.inner = inner
        self.head_size: int = inner.head_size
        self.rotary_dim: int = inner.rotary_dim
        self.is_neox_style: bool = inner.is_neox_style
        # The model dtype, which is q/k's: vLLM would otherwise swap in a converted copy of the buffer.
        inner.cos_sin_cache = torch.zeros(max_num_tokens, self.rotary_dim, dtype=dtype, device=device)
        self.register_buffer("token_rows", torch.arange(max_num_tokens, dtype=torch.int64, device=device), False)
        self.step = StepRope(self.rotary_dim, device=device)

    @property
    def step_buffer(self) -> torch.Tensor:
        return self.inner.cos_sin_cache

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None, *args: Any, **kw: Any
    ):
        return self.inner(self.token_rows[: positions.shape[-1]], query, key, *args, **kw)

    def put(self, slot: int, fs: FactorSet) -> None:
        self.step.put(slot, fs)

    def fill(self, positions: torch.Tensor, slots: torch.Tensor) -> None:
        self.step.fill(self.step_buffer[: positions.shape[0]], positions, slots)

    def nbytes(self) -> int:
        buf = self.step_buffer
        return buf.numel() * buf.element_size() + self.token_rows.numel() * 8 + self.step.nbytes()


def is_rotary(module: torch.nn.Module) -> bool:
    has_table = hasattr(module, "cos_sin_cache") or hasattr(module, "long_short_cos_sin_cache")
    return has_table and hasattr(module, "rotary_dim") and hasattr(module, "head_size")


def unsupported_rotary(module: torch.nn.Module) -> str | None:
    name = type(module).__name__
    if "MRotary" in name or "MRoPE" in name.upper():
        return f"{name} (M-RoPE) is not supported by per-request LongRoPE"
    return None


def kernel_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose kernel rotates q/k. Phi-3's ``Phi3LongRoPEScaledRotaryEmbedding`` keeps a
    [short; long] table and picks one half for the whole engine; it is deliberately replaced by vLLM's
    plain ``RotaryEmbedding`` (neox style, as Phi-3 requires), whose cache becomes the step buffer."""
    if hasattr(module, "cos_sin_cache"):
        return module
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    dtype = module.long_short_cos_sin_cache.dtype
    return RotaryEmbedding(module.head_size, module.rotary_dim, 1, module.base, True, dtype).to(
        module.long_short_cos_sin_cache.device
    )


def replace_rotaries(
    model: torch.nn.Module, max_num_tokens: int, dtype: torch.dtype, device: torch.device
) -> list[StepRotaryEmbedding]:
    """Swap every rotary module of ``model`` for a StepRotaryEmbedding (one per distinct module)."""
    replaced: dict[int, StepRotaryEmbedding] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, StepRotaryEmbedding) or not is_rotary(child):
                continue
            problem = unsupported_rotary(child)
            if problem:
                raise RuntimeError(problem)
            if id(child) not in replaced:
                replaced[id(child)] = StepRotaryEmbedding(kernel_module(child), max_num_tokens, dtype, device)
            setattr(parent, child_name, replaced[id(child)])
    if not replaced:
        raise RuntimeError(f"no rotary embedding found in {type(model).__name__}; per-request LongRoPE needs RoPE")
    return list(replaced.values())
