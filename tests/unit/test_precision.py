"""cos/sin far out: error vs an independent fp64 reference stays at the model dtype's rounding."""

from __future__ import annotations

import math

import pytest
import torch

from factors import FactorSet, cos_sin, cos_sin_table
from factors.rope import dtype_rounding

POSITIONS = [0, 1, 3, 4095, 4096, 65535, 131071, 1_048_575, 2_000_003, 2_097_150, 2_097_151]


def _set(n_hat: int = 0, rotary_dim: int = 128, theta: float = 10000.0) -> FactorSet:
    lam = [1.0 + 63.0 * (i / (rotary_dim // 2 - 1)) ** 2 for i in range(rotary_dim // 2)]
    return FactorSet(
        name="long-2048k",
        max_len=2_097_152,
        original_max_len=4096,
        rotary_dim=rotary_dim,
        rope_theta=theta,
        factors=lam,
        n_hat=n_hat,
    )


def _reference(fs: FactorSet, pos: int) -> tuple[list[float], list[float]]:
    """Scalar float64 math, written independently of factors.rope."""
    cos, sin = [], []
    for i, lam in enumerate(fs.factors):
        theta = fs.rope_theta ** (-2.0 * i / fs.rotary_dim)
        if pos >= fs.n_hat:
            theta /= lam
        a = math.fmod(pos * theta, 2 * math.pi)
        cos.append(math.cos(a) * fs.resolved_mscale)
        sin.append(math.sin(a) * fs.resolved_mscale)
    return cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_hat", [0, 8])
def test_error_within_dtype_rounding(dtype: torch.dtype, n_hat: int) -> None:
    fs = _set(n_hat=n_hat)
    c, s = cos_sin(fs, POSITIONS, dtype=dtype)
    for row, pos in enumerate(POSITIONS):
        rc, rs = (torch.tensor(v, dtype=torch.float64) for v in _reference(fs, pos))
        for ours, ref in ((c[row], rc), (s[row], rs)):
            err = (ours.double() - ref).abs()
            bound = dtype_rounding(ref, dtype)
            assert bool((err <= bound).all()), f"pos {pos}: max err {err.max():.3g} above {dtype} rounding"


def test_naive_fp32_angles_are_not_good_enough() -> None:
    """Why the float64 path exists: fp32 pos·θ at 2,097,151 is off by far more than fp32 rounding."""
    fs = _set()
    pos = 2_097_151
    naive = torch.tensor(float(pos), dtype=torch.float32) * (
        1.0 / (fs.rope_theta ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    )
    ref_angles = torch.tensor([pos * fs.rope_theta ** (-2.0 * i / 128) for i in range(64)], dtype=torch.float64)
    assert (naive.double() - ref_angles).abs().max().item() > 0.01


def test_table_rows_match_cos_sin_and_n_hat() -> None:
    fs = FactorSet(
        name="s",
        max_len=300,
        original_max_len=100,
        rotary_dim=16,
        rope_theta=10000.0,
        factors=[1, 1, 1.5, 2, 2.5, 3, 3, 3],
        n_hat=4,
        mscale=1.2,
    )
    table = cos_sin_table(fs, torch.float32)
    assert table.shape == (300, 16)
    c, s = cos_sin(fs, [0, 3, 4, 299])
    assert torch.equal(table[[0, 3, 4, 299], :8], c) and torch.equal(table[[0, 3, 4, 299], 8:], s)
    # positions < n̂ keep the original angles; mscale applies everywhere
    plain = FactorSet(
        name="p", max_len=300, original_max_len=100, rotary_dim=16, rope_theta=10000.0, factors=[1] * 8, mscale=1.2
    )
    assert torch.equal(table[:4], cos_sin_table(plain, torch.float32)[:4])
    assert not torch.equal(table[4:6], cos_sin_table(plain, torch.float32)[4:6])
    assert math.isclose(table[0, 0].item(), 1.2, rel_tol=1e-7)
