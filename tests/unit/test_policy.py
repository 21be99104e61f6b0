"""Admission policies (upgrade, reserve, pin) and the limits of a request's phases, without an engine."""

from __future__ import annotations

import pytest

from factors.baselines import RopeGeometry, identity_set, make_baseline
from server.policy import AdmissionPolicy, RequestTooLong, SetTable, check_policy, phase_limit, upgrade_target

GEO = RopeGeometry(10000.0, 64, 128)


@pytest.fixture()
def table() -> SetTable:
    short = identity_set(GEO, "short").with_updates(version=1)
    mid = make_baseline("yarn", GEO, 512, name="mid").with_updates(version=1)
    long = make_baseline("yarn", GEO, 1024, name="long").with_updates(version=1)
    return SetTable((long, short, mid))


def test_upgrade_starts_on_the_prompt_and_budgets_to_the_largest_window(table: SetTable) -> None:
    policy = AdmissionPolicy(default_reserve=64)
    a = policy.assign(table, 100, 200, "upgrade")
    assert (a.set.name, a.max_tokens, a.policy) == ("short", 200, "upgrade")
    assert policy.assign(table, 128, None, "upgrade").set.name == "short"  # exactly the window: short, as HF
    assert policy.assign(table, 129, None, "upgrade").set.name == "mid"
    assert policy.assign(table, 100, None, "upgrade").max_tokens == 1024 - 100


def test_reserve_and_pin(table: SetTable) -> None:
    policy = AdmissionPolicy(default_reserve=64)
    assert policy.assign(table, 100, 200, "reserve").set.name == "mid"
    assert policy.assign(table, 100, None, "reserve").set.name == "mid"  # 100 + 64 > 128
    assert policy.assign(table, 50, None, "reserve").set.name == "short"
    pinned = policy.assign(table, 100, 200, "pin")
    assert (pinned.set.name, pinned.max_tokens) == ("short", 28)  # stops at the window
    assert policy.assign(table, 128, 5, "pin").set.name == "mid"  # no room left in short


def test_refusals_name_the_limits(table: SetTable) -> None:
    policy = AdmissionPolicy()
    with pytest.raises(RequestTooLong, match="ask for max_tokens ≤ 924"):
        policy.assign(table, 100, 1000, "upgrade")
    with pytest.raises(RequestTooLong, match="shorten the prompt to at most 1023 tokens"):
        policy.assign(table, 1024, None, "pin")
    with pytest.raises(ValueError, match="longrope_policy must be one of upgrade, reserve, pin; got 'always'"):
        check_policy("always")


def test_phase_limits_follow_hugging_face(table: SetTable) -> None:
    policy = AdmissionPolicy()
    a = policy.assign(table, 100, 500, "upgrade")
    # on short: until the sequence is window + 1 long (the token sampled at position 127 needs no row)
    assert phase_limit(a, table, 100) == (29, True)
    assert upgrade_target(table, 129).name == "mid"
    assert upgrade_target(table, 513).name == "long" and upgrade_target(table, 1025) is None
    on_long = policy.assign(table, 600, 100, "upgrade")
    assert phase_limit(on_long, table, 700) == (324, False)  # the largest set: stop at its window
    pinned = policy.assign(table, 100, 500, "pin")
    assert phase_limit(pinned, table, 100) == (28, False)
    assert a.upgrades is None and a.final is a
