"""LongRoPE rotary math: inverse frequencies, angles and cos/sin tables.

For frequency pair ``i`` of a rotary dimension ``d`` with base ``b``:

    θ_i  = b^(-2i/d)                      (plain RoPE)
    θ_i' = θ_i / λ_i                      (LongRoPE, λ_i from the set)
    angle(p, i) = p · θ_i   if p < n̂      (the first n̂ positions keep the original angles)
                  p · θ_i'  otherwise
    cos, sin    = mscale · cos(angle), mscale · sin(angle)

Precision: fp32 ``p · θ`` is off by up to 0.078 rad at p = 2,097,151, so every angle here is
computed in float64 and reduced mod 2π before the cast to the model dtype; the error is then
the dtype's own rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from .schema import FactorSet

TWO_PI = 2.0 * math.pi


def base_inv_freq(rope_theta: float, rotary_dim: int) -> torch.Tensor:
    """Plain RoPE inverse frequencies θ_i = base^(-2i/d), float64, shape [rotary_dim/2]."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return 1.0 / (float(rope_theta) ** exponents)


def inv_freq(fs: FactorSet) -> torch.Tensor:
    """LongRoPE inverse frequencies θ_i / λ_i of a set, float64."""
    return base_inv_freq(fs.rope_theta, fs.rotary_dim) / torch.tensor(fs.factors, dtype=torch.float64)


def angles(fs: FactorSet, positions: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Rotation angles in [0, 2π), float64, shape [len(positions), rotary_dim/2]."""
    pos = torch.as_tensor(positions, dtype=torch.int64).to(torch.float64).reshape(-1, 1)
    scaled = inv_freq(fs).reshape(1, -1)
    out = pos * scaled
    if fs.n_hat > 0:
        early = pos.reshape(-1) < fs.n_hat
        if bool(early.any()):
            out[early] = pos[early] * base_inv_freq(fs.rope_theta, fs.rotary_dim).reshape(1, -1)
    return torch.remainder(out, TWO_PI)


def cos_sin(
    fs: FactorSet, positions: torch.Tensor | Sequence[int], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin exactly as applied to q/k: mscale included, shape [n, rotary_dim/2] each."""
    theta = angles(fs, positions)
    m = fs.resolved_mscale
    return (torch.cos(theta) * m).to(dtype), (torch.sin(theta) * m).to(dtype)


def iter_table_chunks(
    fs: FactorSet, dtype: torch.dtype, rows: int | None = None, chunk: int = 65536
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start_row, block) of the cos/sin table in vLLM's layout ``[cos half | sin half]``.

    Built in float64 in chunks so a 2M-row table never needs a 2M×d float64 temporary.
    """
    total = fs.max_len if rows is None else rows
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        c, s = cos_sin(fs, torch.arange(start, stop), dtype=torch.float64)
        yield start, torch.cat([c, s], dim=-1).to(dtype)


def cos_sin_table(fs: FactorSet, dtype: torch.dtype = torch.float32, rows: int | None = None) -> torch.Tensor:
    """The whole table, [rows (default max_len), rotary_dim]: cos half then sin half."""
    total = fs.max_len if rows is None else rows
    table = torch.empty(total, fs.rotary_dim, dtype=dtype)
    for start, block in iter_table_chunks(fs, dtype, rows=total):
        table[start : start + block.shape[0]] = block
    return table


def dtype_rounding(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each value's magnitude (float64 result).

    The bound a correctly rounded cast can miss by is half of this; we allow one ulp so that
    a last-bit tie in float64 does not count as an error.
    """
    finfo = torch.finfo(dtype)
    mag = values.abs().to(torch.float64).clamp_min(finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * finfo.eps
