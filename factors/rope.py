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

from factors.geometry import slot_bytes
from factors.schema import FactorSet

__all__ = ["StepRope", "angles", "base_inv_freq", "cos_sin", "cos_sin_table", "inv_freq", "slot_bytes"]

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


# -- per-step cos/sin: the rows of the tokens scheduled now, from each set's few parameters -------------


class StepRope:
    """Exact LongRoPE cos/sin for an arbitrary batch of (position, set) pairs, without any table.

    Each set takes one *slot*: its scaled and original inverse frequencies (float64, rotary_dim/2 each), n̂
    and mscale — O(rotary_dim) numbers, whatever its window. :meth:`fill` writes the cos/sin rows of the
    given tokens into ``out`` (vLLM's layout ``[cos half | sin half]``) in chunks of ``chunk`` tokens, through
    scratch buffers allocated once, so the work per step has fixed addresses and never synchronises with
    the host. Angles are float64 products reduced mod 2π before cos/sin, as :func:`angles` computes them:
    at position p the float64 angle is off by about p · 2⁻⁵³ rad (1e-9 at 10,000,000), far below any
    model dtype's rounding.
    """

    def __init__(self, rotary_dim: int, device: torch.device | str = "cpu", chunk: int = 2048, slots: int = 8) -> None:
        self.rotary_dim = rotary_dim
        self.half = rotary_dim // 2
        self.device = torch.device(device)
        self.chunk = chunk
        f64 = dict(dtype=torch.float64, device=self.device)
        self._scaled = torch.zeros(slots, self.half, **f64)
        self._plain = torch.zeros(slots, self.half, **f64)
        self._n_hat = torch.zeros(slots, **f64)
        self._mscale = torch.zeros(slots, **f64)
        self._freq = torch.empty(chunk, self.half, **f64)
        self._angle = torch.empty(chunk, self.half, **f64)
        self._trig = torch.empty(chunk, self.half, **f64)
        self._pos = torch.empty(chunk, **f64)
        self._row_scale = torch.empty(chunk, 1, **f64)
        self._early = torch.empty(chunk, 1, dtype=torch.bool, device=self.device)

    @property
    def slots(self) -> int:
        return self._scaled.shape[0]

    def put(self, slot: int, fs: FactorSet) -> None:
        """Write a set's parameters into ``slot`` (the slot table grows when ``slot`` is past its end)."""
        if fs.rotary_dim != self.rotary_dim:
            raise ValueError(f"set {fs.label}: rotary_dim {fs.rotary_dim}, but this module rotates {self.rotary_dim}")
        if slot >= self.slots:
            self._grow(max(slot + 1, 2 * self.slots))
        self._scaled[slot].copy_(inv_freq(fs))
        self._plain[slot].copy_(base_inv_freq(fs.rope_theta, fs.rotary_dim))
        self._n_hat[slot] = float(fs.n_hat)
        self._mscale[slot] = fs.resolved_mscale

    def _grow(self, slots: int) -> None:
        for name in ("_scaled", "_plain", "_n_hat", "_mscale"):
            old = getattr(self, name)
            new = torch.zeros((slots, *old.shape[1:]), dtype=old.dtype, device=old.device)
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def nbytes(self) -> int:
        """Memory held: the slot table plus the scratch buffers."""
        tensors = (self._scaled, self._plain, self._n_hat, self._mscale, self._freq, self._angle, self._trig)
        return sum(t.numel() * t.element_size() for t in (*tensors, self._pos, self._row_scale, self._early))

    def fill(self, out: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """``out[t] = [mscale·cos(angle(positions[t])) | mscale·sin(...)]`` under the set in ``slots[t]``."""
        total = positions.shape[0]
        for start in range(0, total, self.chunk):
            n = min(self.chunk, total - start)
            self._chunk(out[start : start + n], positions[start : start + n], slots[start : start + n], n)

    def _chunk(self, out: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, n: int) -> None:
        pos, freq, angle, trig = self._pos[:n], self._freq[:n], self._angle[:n], self._trig[:n]
        early, row_scale = self._early[:n], self._row_scale[:n]
        pos.copy_(positions)
        torch.index_select(self._scaled, 0, slots, out=freq)
        # positions below the set's n̂ keep the original (un-interpolated) frequencies
        torch.index_select(self._n_hat, 0, slots, out=row_scale[:, 0])
        torch.lt(pos, row_scale[:, 0], out=early[:, 0])
        torch.index_select(self._plain, 0, slots, out=angle)
        torch.where(early, angle, freq, out=freq)
        torch.mul(pos.unsqueeze(1), freq, out=angle)
        torch.remainder(angle, TWO_PI, out=angle)
        torch.index_select(self._mscale, 0, slots, out=row_scale[:, 0])
        torch.cos(angle, out=trig)
        trig.mul_(row_scale)
        out[:, : self.half].copy_(trig)
        torch.sin(angle, out=trig)
        trig.mul_(row_scale)
        out[:, self.half :].copy_(trig)
