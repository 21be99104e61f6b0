"""LongRoPE2's critical dimension and the constraint it puts on a search's candidates.

RoPE pair i turns at θ_i = b^(-2i/d) (d = rotary_dim, b = rope_theta), one full turn every T_i = 2π·b^(2i/d)
positions. Pairs whose period is longer than the pretraining window L never completed a turn in training:
they saw only part of their angle range, so any position past L gives them angles they never saw. The first
such pair is the critical pair

    k_c = ⌈(d/2)·log_b(L / 2π)⌉        (the paper's critical dimension d_tcd = 2·k_c counts dimensions)

LongRoPE2 (arXiv 2502.20082) asks the search to interpolate every pair from there on by at least the
extension ratio s = L'/L, so that their angles at the new window stay within the range they saw in training:
λ_i ≥ s for i ≥ k_c. Pairs below it are searched as LongRoPE searches them (non-decreasing λ).

Here the critical dimension is given as a *pair index* (0 … rotary_dim/2), the index into a set's ``factors``;
``auto`` computes k_c from the model's geometry. No torch here: the CLI resolves ``--critical-dim`` before
loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from factors.geometry import RopeGeometry
from factors.schema import FactorSet

CRITICAL_CHOICES_HELP = "auto (the theoretical critical pair of the model's geometry), a pair index N, or off"


def theoretical_critical_pair(geo: RopeGeometry) -> int:
    """k_c = ⌈(d/2)·log_b(L / 2π)⌉: the first RoPE pair whose period exceeds the original window, clamped to
    [0, d/2] (d/2 when every period fits in the window: nothing to constrain)."""
    half = geo.rotary_dim // 2
    ratio = geo.original_max_len / (2 * math.pi)
    if ratio <= 1:
        return 0
    k = math.ceil(half * math.log(ratio) / math.log(geo.rope_theta) - 1e-12)
    return max(0, min(half, k))


def period(geo: RopeGeometry, pair: int) -> float:
    """Positions per full turn of RoPE pair ``pair`` at the original frequencies."""
    return 2 * math.pi * geo.rope_theta ** (2 * pair / geo.rotary_dim)


def parse_critical_dim(text: str) -> str | int | None:
    """``auto`` | ``off`` | a pair index ≥ 0 (as given to ``--critical-dim``); ValueError otherwise."""
    value = text.strip().lower()
    if value in ("auto", "off"):
        return None if value == "off" else "auto"
    try:
        pair = int(value)
    except ValueError:
        raise ValueError(f"--critical-dim takes {CRITICAL_CHOICES_HELP}; got {text!r}") from None
    if pair < 0:
        raise ValueError(f"--critical-dim must be ≥ 0 (a RoPE pair index), got {pair}")
    return pair


def resolve_critical_pair(spec: str | int | None, geo: RopeGeometry) -> int | None:
    """The pair index a ``--critical-dim`` value means for a model (None: no constraint)."""
    if spec is None:
        return None
    if spec == "auto":
        return theoretical_critical_pair(geo)
    pair = int(spec)
    if pair > geo.rotary_dim // 2:
        raise ValueError(
            f"--critical-dim {pair} is beyond the model's {geo.rotary_dim // 2} RoPE pairs (give 0 … {geo.rotary_dim // 2},"
            " auto or off)"
        )
    return pair


def apply_floor(factors: Sequence[float], pair: int | None, floor: float) -> list[float]:
    """λ with every pair from ``pair`` on raised to at least ``floor`` (the extension ratio). A non-decreasing
    λ stays non-decreasing: only the tail is raised, and to one common floor."""
    out = [float(f) for f in factors]
    if pair is None:
        return out
    for i in range(pair, len(out)):
        out[i] = max(out[i], floor)
    return out


def satisfies(factors: Sequence[float], pair: int | None, floor: float, tol: float = 1e-12) -> bool:
    """Whether λ obeys the critical-dimension constraint (λ_i ≥ floor for every i ≥ pair)."""
    return pair is None or all(f >= floor - tol for f in factors[pair:])


def turned_seed(prev: FactorSet, target_len: int) -> tuple[str, list[float], int]:
    """A set a model was fine-tuned under, extended to a longer window the way YaRN extends itself: pairs that
    turned a full circle within the set's window (θ_i·W/λ_i ≥ 2π) saw every angle in fine-tuning and keep their
    λ; the others are interpolated further by target_len / W, so their angles at the new window stay within
    the range fine-tuning showed them. n̂ is kept. A seed for the search past a fine-tuned length: on the
    fine-tuned retrieval fixture it measured a held-out perplexity of 8.95 at 4096, where the 16k set searched
    from the stretched seed
    (:func:`factors.search.evolution.scaled_seed`) alone measured 18.7 (docs/effective-context.md)."""
    grow = target_len / prev.max_len
    lam = []
    for i, f in enumerate(prev.factors):
        theta = prev.rope_theta ** (-2 * i / prev.rotary_dim)
        lam.append(f if theta * prev.max_len / f >= 2 * math.pi else f * grow)
    return (f"turned-{prev.max_len}", lam, prev.n_hat)
