"""The set catalogue without vLLM: versions, in-flight counts, load / rollback / retire, a worker that cannot
take a set, the registry and replica sync — behind an in-memory Workers of two ranks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from memory_catalogue import MemoryWorkers, make_catalogue, make_set

from factors import FactorSetError
from server.catalogue import UnknownSetError, WorkerSetError
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
    with pytest.raises(FactorSetError, match="only set serving 129–1024 tokens"):
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
