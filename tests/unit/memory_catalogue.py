"""An in-memory set catalogue for unit tests without vLLM: ranks that hold slots as the engine's workers do,
two sets (short 128, long 1024) on a rotary_dim-4 model."""

from __future__ import annotations

import asyncio
from typing import Any

from factors import FactorSet, parse_factor_set
from factors.formats import ModelRope
from factors.geometry import RopeGeometry
from server.catalogue import SetCatalogue
from server.registry import Registry


class MemoryWorkers:
    """Ranks that hold slots the way the engine's workers do; ``fail_on`` makes one rank refuse a name."""

    def __init__(self, ranks: int = 2) -> None:
        self.slots: list[set[str]] = [set() for _ in range(ranks)]
        self.fail_on: tuple[int, str] | None = None

    async def load(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        label = f"{data['name']}@{data['version']}"
        results = []
        for rank, held in enumerate(self.slots):
            if self.fail_on == (rank, data["name"]):
                results.append({"ok": False, "error": "RuntimeError: rank lost its device"})
                continue
            results.append({"ok": True, "loaded": label not in held})
            held.add(label)
        return results

    async def release(self, label: str) -> None:
        for held in self.slots:
            held.discard(label)

    async def status(self) -> list[dict[str, Any]]:
        return [{"slots": {k: {} for k in held}, "rope_bytes": 1000, "step_tokens": 16} for held in self.slots]


def make_set(name: str, window: int, top: float = 2.0, version: int | None = 1) -> FactorSet:
    body = {"name": name, "factors": [1.0, top], "rope_theta": 10000.0, "rotary_dim": 4}
    return parse_factor_set({**body, "original_max_len": 128, "max_len": window, "version": version})


MODEL = ModelRope(RopeGeometry(10000.0, 4, 128), 128, "default", None, 4)


def make_catalogue(workers: MemoryWorkers, registry: Registry | None = None) -> SetCatalogue:
    sets = [make_set("short", 128), make_set("long", 1024)]
    if registry is not None:
        sets = registry.restore(sets)
    cat = SetCatalogue(workers, MODEL, sets, 1024, registry)
    for fs in sets:
        asyncio.run(workers.load(fs.model_dump(mode="json")))
    return cat
