"""Hand-designed RoPE extensions expressed as factor sets (λ_i = θ_i / θ_i').

The formulas are those of Hugging Face transformers' ``ROPE_INIT_FUNCTIONS`` (``linear``,
``dynamic``, ``yarn``), so a set made here applies the same frequencies and attention factor
as transformers does for the same config; the unit tests check that to 1e-6.
"""

from __future__ import annotations

import math

import torch

from factors.geometry import RopeGeometry
from factors.rope import base_inv_freq
from factors.schema import FactorSet, Provenance

BASELINE_METHODS = ("identity", "pi", "ntk", "yarn")


def _factor_set(
    geo: RopeGeometry, name: str, max_len: int, inv: torch.Tensor, mscale: float, method: str, **metrics: float
) -> FactorSet:
    lam = (base_inv_freq(geo.rope_theta, geo.rotary_dim) / inv).tolist()
    return FactorSet(
        name=name,
        max_len=max_len,
        original_max_len=geo.original_max_len,
        rotary_dim=geo.rotary_dim,
        rope_theta=geo.rope_theta,
        factors=[float(x) for x in lam],
        mscale=float(mscale),
        model=geo.model,
        provenance=Provenance(method=method, metrics=dict(metrics)),
    )


def identity_set(geo: RopeGeometry, name: str = "original", max_len: int | None = None) -> FactorSet:
    """Plain RoPE over the model's original window (λ_i = 1, mscale 1)."""
    window = max_len or geo.original_max_len
    return _factor_set(geo, name, window, base_inv_freq(geo.rope_theta, geo.rotary_dim), 1.0, "identity")


def pi_set(geo: RopeGeometry, target_len: int, name: str | None = None) -> FactorSet:
    """Position interpolation (HF ``linear``): every frequency divided by s; attention factor 1."""
    s = target_len / geo.original_max_len
    inv = base_inv_freq(geo.rope_theta, geo.rotary_dim) / s
    return _factor_set(geo, name or f"pi-{target_len}", target_len, inv, 1.0, "pi", factor=s)


def ntk_set(geo: RopeGeometry, target_len: int, factor: float = 1.0, name: str | None = None) -> FactorSet:
    """NTK-aware scaling as HF ``dynamic`` computes it at ``seq_len = target_len``:
    base' = base · (factor·L/L_orig − (factor − 1))^(d/(d−2)). factor = 1 gives the classic
    static NTK-aware base · s^(d/(d−2)). Attention factor 1."""
    d = geo.rotary_dim
    seq_len = max(target_len, geo.original_max_len)
    new_base = geo.rope_theta * ((factor * seq_len / geo.original_max_len) - (factor - 1)) ** (d / (d - 2))
    inv = base_inv_freq(new_base, d)
    return _factor_set(geo, name or f"ntk-{target_len}", target_len, inv, 1.0, "ntk", alpha=new_base / geo.rope_theta)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1·mscale·ln(s) + 1 (1 when s ≤ 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_set(
    geo: RopeGeometry,
    target_len: int,
    *,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
    truncate: bool = True,
    name: str | None = None,
) -> FactorSet:
    """YaRN ("NTK-by-parts"): frequencies that turn fewer than beta_slow times in the original
    window are interpolated by s, those that turn more than beta_fast times are kept, with a
    linear ramp between; attention factor 0.1·ln(s) + 1 (HF ``yarn`` semantics)."""
    d, base, orig = geo.rotary_dim, geo.rope_theta, geo.original_max_len
    s = target_len / orig
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(s)

    def correction_dim(rotations: float) -> float:
        return (d * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # the same guard against a zero-width ramp as the reference
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep θ_i), 0: interpolate (θ_i / s)
    extrapolated = base_inv_freq(base, d)
    inv = extrapolated / s * (1 - keep) + extrapolated * keep
    return _factor_set(geo, name or f"yarn-{target_len}", target_len, inv, attention_factor, "yarn", factor=s)


def make_baseline(method: str, geo: RopeGeometry, target_len: int, name: str | None = None) -> FactorSet:
    """Build one of BASELINE_METHODS for a target window."""
    if method == "identity":
        return identity_set(geo, name or "original", target_len)
    if method == "pi":
        return pi_set(geo, target_len, name)
    if method == "ntk":
        return ntk_set(geo, target_len, name=name)
    if method == "yarn":
        return yarn_set(geo, target_len, name=name)
    raise ValueError(f"unknown baseline method {method!r}; expected one of {', '.join(BASELINE_METHODS)}")
