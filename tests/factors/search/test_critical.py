"""LongRoPE2's critical dimension: its definition on real geometries, the floor it puts on a search's
candidates (every individual evaluated obeys it, and it binds), and ``--critical-dim`` parsing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from factors.cli.main import main
from factors.formats import read_model_rope
from factors.geometry import RopeGeometry
from factors.search.critical import (
    apply_floor,
    parse_critical_dim,
    period,
    resolve_critical_pair,
    satisfies,
    theoretical_critical_pair,
    turned_seed,
)
from factors.search.evolution import LongRopeSearch, SearchConfig, is_valid

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "factors" / "data" / "tiny-short" / "model"


@pytest.mark.parametrize(
    ("theta", "dim", "window", "pair"),
    [
        (500_000.0, 128, 8192, 35),  # LLaMA3-8B: the paper's d_tcd = 2·35 = 70 dimensions
        (10_000.0, 96, 4096, 34),  # Phi3-mini
        (10_000.0, 64, 128, 11),  # the tiny fixtures, W = 128
        (10_000.0, 64, 256, 13),  # W = 256
    ],
)
def test_critical_pair_is_the_first_pair_whose_period_exceeds_the_window(
    theta: float, dim: int, window: int, pair: int
) -> None:
    geo = RopeGeometry(theta, dim, window)
    k = theoretical_critical_pair(geo)
    assert k == pair
    assert period(geo, k) >= window > period(geo, k - 1)
    assert k == math.ceil(dim / 2 * math.log(window / (2 * math.pi)) / math.log(theta))


def test_tiny_fixture_geometry_gives_its_critical_pair() -> None:
    geo = read_model_rope(TINY).geometry
    assert resolve_critical_pair("auto", geo) == theoretical_critical_pair(geo) == 11
    assert resolve_critical_pair(5, geo) == 5 and resolve_critical_pair(None, geo) is None
    with pytest.raises(ValueError, match="beyond the model's 32 RoPE pairs"):
        resolve_critical_pair(33, geo)


def test_floor_keeps_lambda_monotone_and_only_raises_the_tail() -> None:
    lam = [1.0, 1.5, 2.0, 3.0, 9.0, 10.0]
    out = apply_floor(lam, 2, 8.0)
    assert out == [1.0, 1.5, 8.0, 8.0, 9.0, 10.0]
    assert all(a <= b for a, b in zip(out, out[1:], strict=False))
    assert satisfies(out, 2, 8.0) and not satisfies(lam, 2, 8.0) and satisfies(lam, None, 8.0)
    assert apply_floor(lam, None, 8.0) == lam


def test_parse_critical_dim() -> None:
    assert parse_critical_dim("auto") == "auto" and parse_critical_dim("OFF") is None
    assert parse_critical_dim("12") == 12
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(ValueError):
            parse_critical_dim(bad)


def test_every_candidate_obeys_the_floor_and_the_floor_binds() -> None:
    """A fitness that rewards small λ drives the search against the constraint: every individual it
    evaluates has λ_i ≥ s past the critical pair, and the best one sits on the floor there."""
    geo = RopeGeometry(10_000.0, 64, 128)
    config = SearchConfig(
        target_len=1024, population=10, parents=5, mutations=4, crossovers=4, generations=4, critical_pair=11
    )
    seen = []

    def fitness(fs):  # noqa: ANN001, ANN202 - the search's fitness callable
        seen.append(fs.factors)
        return sum(fs.factors)

    search = LongRopeSearch(geo, fitness, config, progress=False)
    best = search.run()
    s = 1024 / 128
    assert len(seen) > 20
    low, high = config.bounds(geo)
    for lam in seen:
        assert is_valid(lam, 0, low, high, (0,), critical_pair=11, floor=s)
    assert min(best.factors[11:]) == pytest.approx(s)
    assert best.provenance.metrics["critical_pair"] == 11 and best.provenance.metrics["critical_floor"] == s
    # without the constraint the same search goes below s past pair 11
    free = LongRopeSearch(
        geo, lambda fs: sum(fs.factors), SearchConfig(**{**config.__dict__, "critical_pair": None}), progress=False
    )
    assert min(free.run().factors[11:]) < s


def test_a_floor_above_the_upper_bound_is_refused() -> None:
    geo = RopeGeometry(10_000.0, 64, 128)
    with pytest.raises(ValueError, match="raise --high"):
        LongRopeSearch(geo, sum, SearchConfig(target_len=1024, high=4.0, critical_pair=3), progress=False)


def test_cli_refuses_a_bad_critical_dim(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["search", "--model", str(TINY), "--target-len", "256", "--critical-dim", "many"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "auto (the theoretical critical pair" in capsys.readouterr().err
    assert main(["search", "--model", str(TINY), "--target-len", "256", "--critical-dim", "40"]) == 2
    assert "beyond the model's 32 RoPE pairs" in capsys.readouterr().err


def test_turned_seed_extends_only_the_pairs_that_never_turned_a_full_circle() -> None:
    """YaRN's rule applied to a fine-tuned set: a pair whose angle passed 2π within the set's window keeps its
    λ, every other pair is interpolated further by the window ratio; n̂ stays."""
    from factors.baselines import make_baseline

    geo = read_model_rope(TINY).geometry  # rotary_dim 64, base 10000, window 128
    fs = make_baseline("yarn", geo, 1024).model_copy(update={"n_hat": 4})
    name, lam, n_hat = turned_seed(fs, 8192)
    assert name == "turned-1024" and n_hat == 4
    turned = [2 * math.pi * f / geo.rope_theta ** (-2 * i / 64) <= 1024 for i, f in enumerate(fs.factors)]
    assert 0 < sum(turned) < len(turned)  # both kinds of pair occur
    for f, new, kept in zip(fs.factors, lam, turned, strict=True):
        assert new == pytest.approx(f if kept else 8 * f)
    assert all(b >= a for a, b in zip(lam, lam[1:], strict=False))  # still non-decreasing
