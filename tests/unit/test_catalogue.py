"""The set catalogue without vLLM: versions, in-flight counts, load / rollback / retire, routing (explicit
loads, promote, demote), a worker that cannot take a set, the registry and replica sync — behind an
in-memory Workers of two ranks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from memory_catalogue import MemoryWorkers, make_catalogue, make_set

from factors import FactorSetError
from server.catalogue import RoutingRefused, UnknownSetError, WorkerSetError
from server.policy import Assignment
from server.registry import Registry


def test_load_makes_a_new_version_and_drops_the_old_after_its_last_request(tmp_path: Path) -> None:
    workers = MemoryWorkers()
    cat = make_catalogue(workers, Registry(tmp_path))
    running = Assignment(set=cat.table.get("long"), max_tokens=10, prompt_tokens=500)
    cat.count(running)
    loaded = asyncio.run(cat.load_set(make_set("long", 1024, top=3.0, version=None)))
    assert loaded.label == "long@2" and cat.table.get("long").label == "long@2"
    assert sorted(cat.history["long"]) == [1, 2]
    assert all({"long@1", "long@2"} <= held for held in workers.slots), "long@1 dropped while in flight"
    asyncio.run(cat.end_admission(running))
    assert all("long@1" not in held and "long@2" in held for held in workers.slots)
    assert Registry(tmp_path).read_state().live == {"short": 1, "long": 2}


def test_rollback_and_retire_rules() -> None:
    workers = MemoryWorkers()
    cat = make_catalogue(workers)
    with pytest.raises(FactorSetError, match="no earlier version"):
        asyncio.run(cat.rollback_set("long"))
    asyncio.run(cat.load_set(make_set("long", 1024, top=3.0, version=None)))
    assert asyncio.run(cat.rollback_set("long")).label == "long@1"
    with pytest.raises(RoutingRefused, match="no set for automatic routing of 129–1024 tokens"):
        asyncio.run(cat.retire_set("long"))
    with pytest.raises(UnknownSetError, match="no live set named 'nope'"):
        asyncio.run(cat.retire_set("nope"))
    assert asyncio.run(cat.retire_set("short")).label == "short@1"
    assert [fs.label for fs in cat.table.sets] == ["long@1"]
    assert all("short@1" not in held for held in workers.slots)
    with pytest.raises(FactorSetError, match="last live set"):
        asyncio.run(cat.retire_set("long"))


def test_a_rank_that_cannot_take_a_set_changes_nothing(tmp_path: Path) -> None:
    workers = MemoryWorkers()
    registry = Registry(tmp_path)
    cat = make_catalogue(workers, registry)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json"))
    workers.fail_on = (1, "long")
    with pytest.raises(WorkerSetError, match=r"long@2: RuntimeError: rank lost its device \(1 of 2 workers failed\)"):
        asyncio.run(cat.load_set(make_set("long", 1024, top=3.0, version=None)))
    assert cat.table.get("long").label == "long@1" and sorted(cat.history["long"]) == [1]
    assert all("long@2" not in held for held in workers.slots), "the rank that took it kept it"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json")) == files
    assert registry.read_state().live == {"short": 1, "long": 1}


def test_replicas_sync_through_the_registry(tmp_path: Path) -> None:
    a_workers, b_workers = MemoryWorkers(), MemoryWorkers()
    a, b = make_catalogue(a_workers, Registry(tmp_path)), make_catalogue(b_workers, Registry(tmp_path))
    asyncio.run(a.load_set(make_set("long", 1024, top=3.0, version=None)))
    assert asyncio.run(b.sync_from_registry()) == ["long@1 -> long@2"]
    assert b.table.get("long").label == "long@2" and all("long@2" in held for held in b_workers.slots)
    assert asyncio.run(b.sync_from_registry()) == []


def test_rope_status_reports_the_largest_rank() -> None:
    cat = make_catalogue(MemoryWorkers())
    assert asyncio.run(cat.rope_status()) == {"state_bytes": 1000, "step_tokens": 16, "versions_held": 2, "workers": 2}


def _state(cat, registry: Registry) -> tuple:
    """Everything a refused call must leave as it was: the table, its routing, the registry's files."""
    files = {str(p.relative_to(registry.root)): p.read_text() for p in sorted(registry.root.rglob("*.json"))}
    return [fs.label for fs in cat.table.sets], cat.table.explicit, files


def test_explicit_load_promote_demote_persist_and_survive_a_restart(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    cat = make_catalogue(MemoryWorkers(), registry)
    probe = asyncio.run(cat.load_set(make_set("probe", 256, version=None), "explicit"))
    assert probe.label == "probe@1" and cat.table.routing("probe") == "explicit"
    assert [fs.name for fs in cat.table.auto] == ["short", "long"], "an explicit set joined automatic routing"
    assert registry.read_state().explicit == ["probe"]
    # a new version keeps the name's routing, and so does a rollback
    assert asyncio.run(cat.load_set(make_set("probe", 256, top=3.0, version=None))).label == "probe@2"
    assert asyncio.run(cat.rollback_set("probe")).label == "probe@1"
    assert cat.table.routing("probe") == "explicit" and registry.read_state().explicit == ["probe"]
    # a restart on the same registry (a new catalogue) keeps it
    again = make_catalogue(MemoryWorkers(), Registry(tmp_path))
    assert again.table.explicit == {"probe"} and again.table.get("probe").label == "probe@1"
    assert asyncio.run(cat.set_routing("probe", "auto")).label == "probe@1"
    assert [fs.name for fs in cat.table.auto] == ["short", "probe", "long"] and registry.read_state().explicit == []
    assert asyncio.run(cat.set_routing("probe", "auto")).label == "probe@1"  # already auto: nothing changes
    asyncio.run(cat.set_routing("probe", "explicit"))
    assert cat.table.explicit == {"probe"} and registry.read_state().explicit == ["probe"]
    # retiring an explicit set is always allowed, and forgets its routing
    assert asyncio.run(cat.retire_set("probe")).label == "probe@1"
    assert registry.read_state().explicit == [] and cat.table.explicit == frozenset()


def test_rejected_routing_changes_change_nothing(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    cat = make_catalogue(MemoryWorkers(), registry)
    asyncio.run(cat.load_set(make_set("probe", 256, version=None), "explicit"))
    before = _state(cat, registry)
    with pytest.raises(RoutingRefused, match="demoting long@1 would leave no set for automatic routing of 129–1024"):
        asyncio.run(cat.set_routing("long", "explicit"))
    with pytest.raises(UnknownSetError, match="no live set named 'nope'"):
        asyncio.run(cat.set_routing("nope", "auto"))
    with pytest.raises(RoutingRefused, match="loading long with routing explicit"):
        asyncio.run(cat.load_set(make_set("long", 1024, top=3.0, version=None), "explicit"))
    assert _state(cat, registry) == before
    asyncio.run(cat.retire_set("short"))  # long alone is auto now: demoting it leaves none
    with pytest.raises(RoutingRefused, match="no set for automatic routing \\(requests that name no set\\)"):
        asyncio.run(cat.set_routing("long", "explicit"))
    with pytest.raises(RoutingRefused, match="retiring long@1 would leave no set for automatic routing"):
        asyncio.run(cat.retire_set("long"))
    # a demotion below the largest auto window is allowed: the larger set takes those requests
    asyncio.run(cat.set_routing("probe", "auto"))
    asyncio.run(cat.set_routing("probe", "explicit"))
    assert cat.table.explicit == {"probe"}


def test_replicas_sync_routing_through_the_registry(tmp_path: Path) -> None:
    a, b = make_catalogue(MemoryWorkers(), Registry(tmp_path)), make_catalogue(MemoryWorkers(), Registry(tmp_path))
    asyncio.run(a.load_set(make_set("probe", 256, version=None), "explicit"))
    assert asyncio.run(b.sync_from_registry()) == ["probe -> probe@1"]
    assert b.table.routing("probe") == "explicit"
    asyncio.run(a.set_routing("probe", "auto"))
    assert asyncio.run(b.sync_from_registry()) == ["probe routing -> auto"] and b.table.explicit == frozenset()
    asyncio.run(b.retire_set("probe"))
    assert asyncio.run(a.sync_from_registry()) == ["probe@1 retired"] and a.table.get("probe") is None


def test_a_registry_with_no_auto_set_refuses_to_start(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    make_catalogue(MemoryWorkers(), registry)
    state = registry.read_state()
    state.explicit = ["short", "long"]
    registry.write_state(state)
    with pytest.raises(FactorSetError, match="leaves no set for automatic routing"):
        make_catalogue(MemoryWorkers(), Registry(tmp_path))
