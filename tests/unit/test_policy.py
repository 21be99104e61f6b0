"""Admission policies (upgrade, reserve, pin), routing (auto, explicit), named sets and the limits of a
request's phases, without an engine."""

from __future__ import annotations

import pytest

from factors.baselines import RopeGeometry, identity_set, make_baseline
from server.policy import (
    AdmissionPolicy,
    RequestTooLong,
    SetTable,
    UnknownFactorSet,
    check_policy,
    check_routing,
    phase_limit,
    upgrade_target,
)

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


def test_automatic_routing_never_picks_an_explicit_set(table: SetTable) -> None:
    probe = make_baseline("yarn", GEO, 256, name="probe").with_updates(version=1)
    routed = table.with_set(probe, "explicit")
    policy = AdmissionPolicy(default_reserve=64)
    # 200 tokens: probe (256) is the smallest window that fits, but only a request naming it gets it
    for name in ("upgrade", "reserve", "pin"):
        assert policy.assign(routed, 200, 8, name).set.name == "mid"
    assert upgrade_target(routed, 200).name == "mid"
    on_short = policy.assign(routed, 100, 500, "upgrade")
    assert phase_limit(on_short, routed, 100) == (29, True)
    assert routed.describe() == "short@1 (≤128), probe@1 (≤256, explicit), mid@1 (≤512), long@1 (≤1024)"
    # an explicit set larger than every auto set does not widen automatic routing
    huge = make_baseline("yarn", GEO, 2048, name="huge").with_updates(version=1)
    wide = routed.with_set(huge, "explicit")
    assert wide.largest_window == 1024 and upgrade_target(wide, 1100) is None
    on_long = policy.assign(wide, 600, 100, "upgrade")
    assert phase_limit(on_long, wide, 700) == (324, False)
    with pytest.raises(RequestTooLong, match="largest factor set window is 1024 tokens"):
        policy.assign(wide, 1500, 8, "upgrade")
    # a new version keeps the name's routing; promotion makes it the smallest fit
    assert routed.with_set(probe.with_updates(version=2)).routing("probe") == "explicit"
    assert policy.assign(routed.with_routing("probe", "auto"), 200, 8, "upgrade").set.name == "probe"


def test_a_named_request_is_pinned_to_its_set(table: SetTable) -> None:
    probe = make_baseline("yarn", GEO, 256, name="probe").with_updates(version=1)
    routed = table.with_set(probe, "explicit")
    policy = AdmissionPolicy(default_reserve=64)
    named = policy.assign_named(routed, "probe", 200, 8)
    assert (named.set.name, named.policy, named.max_tokens) == ("probe", "pin", 8)
    assert phase_limit(named, routed, 200) == (56, False)  # never moves up, stops at its window
    assert policy.assign_named(routed, "long", 10, None).max_tokens == 1014  # an auto set may be named too
    assert policy.assign_named(routed, "probe", 100, None, "reserve").max_tokens == 156
    with pytest.raises(RequestTooLong, match=r"\+ max_tokens \(100\) = 300 tokens exceeds the window of probe@1"):
        policy.assign_named(routed, "probe", 200, 100)
    with pytest.raises(RequestTooLong, match=r"default reserve \(64; no max_tokens sent\) = 264 tokens.*≤ 56"):
        policy.assign_named(routed, "probe", 200, None)
    with pytest.raises(RequestTooLong, match="shorten the prompt to at most 255 tokens"):
        policy.assign_named(routed, "probe", 256, 1)
    with pytest.raises(
        UnknownFactorSet, match=r"'nope' is not a live factor set; live: short@1 \(≤128\), probe@1"
    ) as err:
        policy.assign_named(routed, "nope", 10, 1)
    assert err.value.param == "vllm_xargs.longrope_factor_set"
    with pytest.raises(UnknownFactorSet, match="must be the name of a live factor set, got 5"):
        policy.assign_named(routed, 5, 10, 1)
    with pytest.raises(ValueError, match="longrope_policy 'upgrade' cannot apply to a request naming its set"):
        policy.assign_named(routed, "probe", 10, 1, "upgrade")


def test_routing_loss(table: SetTable) -> None:
    assert table.routing_loss(table.with_routing("short", "explicit")) is None  # mid takes those requests
    assert table.routing_loss(table.with_routing("long", "explicit")) == (
        "no set for automatic routing of 513–1024 tokens (the auto sets would reach 512)"
    )
    alone = SetTable(table.sets[:1])
    assert alone.routing_loss(alone.with_routing("short", "explicit")) == (
        "no set for automatic routing (requests that name no set)"
    )
    assert check_routing("explicit") == "explicit"
    with pytest.raises(ValueError, match="routing must be one of auto, explicit; got 'sometimes'"):
        check_routing("sometimes")
