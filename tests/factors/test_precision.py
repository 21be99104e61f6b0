"""cos/sin far out: error vs an independent fp64 reference stays at the model dtype's rounding."""

from __future__ import annotations

import math

import pytest
import torch

from factors import FactorSet, cos_sin, cos_sin_table
from factors.rope import StepRope, angles, dtype_rounding, inv_freq

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


# -- the per-step computation the server runs (factors.rope.StepRope) --------------------------------------

FAR = [0, 5, 7, 8, 9, 4095, 4096, 2_097_151, 4_194_303, 8_388_608, 9_999_999, 10_000_000]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_step_rope_mixed_sets_to_ten_million(dtype: torch.dtype) -> None:
    """Tokens of three sets interleaved in one step, positions up to 10,000,000: every cos/sin within the
    dtype's rounding of the scalar float64 reference, and exactly the rows of ``cos_sin``."""
    sets = [_set(), _set(n_hat=8), _set().with_updates(name="s2", factors=[1.0] * 64, mscale=1.4)]
    step = StepRope(128, chunk=5)  # chunks smaller than the batch: the loop over chunks is exercised
    for slot, fs in zip((0, 1, 12), sets, strict=True):  # slot 12 makes the slot table grow
        step.put(slot, fs)
    positions = torch.tensor([p for p in FAR for _ in range(3)], dtype=torch.int64)
    slot_ids = torch.tensor([0, 1, 12] * len(FAR), dtype=torch.int64)
    out = torch.full((len(positions) + 4, 128), float("nan"), dtype=dtype)
    step.fill(out, positions, slot_ids)
    assert bool(out[len(positions) :].isnan().all()), "rows past the batch were written"
    for row, (pos, slot) in enumerate(zip(positions.tolist(), slot_ids.tolist(), strict=True)):
        fs = sets[(0, 1, 12).index(slot)]
        rc, rs = (torch.tensor(v, dtype=torch.float64) for v in _reference(fs, pos))
        for ours, ref in ((out[row, :64], rc), (out[row, 64:], rs)):
            err = (ours.double() - ref).abs()
            assert bool((err <= dtype_rounding(ref, dtype)).all()), f"pos {pos} slot {slot}: err {err.max():.3g}"
        c, s = cos_sin(fs, [pos], dtype=dtype)
        assert torch.equal(out[row, :64], c[0]) and torch.equal(out[row, 64:], s[0])


def test_step_rope_angles_against_exact_arithmetic() -> None:
    """The float64 angle (product reduced mod 2π) vs exact rational arithmetic at 10,000,000: within
    2e-9 rad, four orders below fp32's rounding of an angle near π (2.4e-7)."""
    from fractions import Fraction

    import mpmath

    fs = _set()
    pos = 10_000_000
    theta = angles(fs, [pos])[0].tolist()
    mpmath.mp.dps = 50
    two_pi = Fraction(mpmath.nstr(2 * mpmath.pi, 45))
    freqs = inv_freq(fs).tolist()
    worst = 0.0
    for ours, f in zip(theta, freqs, strict=True):
        exact = (pos * Fraction(f)) % two_pi  # the float64 frequency taken exactly, product and reduction exact
        worst = max(worst, abs(float(Fraction(ours) - exact)))
    assert worst < 2e-9, worst


def test_step_rope_memory_is_independent_of_windows() -> None:
    small = StepRope(128)
    small.put(0, _set().with_updates(max_len=4096))
    large = StepRope(128)
    large.put(0, _set())
    assert small.nbytes() == large.nbytes() < 4 * 2**20
