"""The set catalogue: every version of every factor set a server knows, which ones are live (and which of
those automatic routing may pick), how many requests each version has in flight, and loading, rolling back,
retiring, promoting and demoting them — persisted in the registry and synced with replicas sharing it.

It talks to the engine's workers only through :class:`Workers` (give a set, release a set, report), so it runs
and is unit-tested without vLLM; :class:`~server.vllm_ext.engine_client.EngineWorkers` is the vLLM one.

Length (≈420 lines): the version lifecycle is one state machine (history, live table with its routing,
in-flight counts, registry, workers); every transition holds the same lock and must keep all five consistent.

Routing rules (every refused call changes nothing): a name keeps its routing across new versions, rollbacks
and replica sync until it is promoted or demoted; retiring a name forgets it. No change may take ground
from automatic routing — leave no ``auto`` set, or lower the largest window the ``auto`` sets reach
(:meth:`~server.policy.SetTable.routing_loss`) — so a demotion, an explicit load of a live ``auto`` name and
a retirement are refused when they would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any, Protocol

from factors.formats import ModelRope, check_compatible
from factors.schema import FactorSet, FactorSetError

from . import metrics
from .policy import Assignment, SetTable
from .protocol import Routing
from .registry import Registry

logger = logging.getLogger("longrope.catalogue")


class UnknownSetError(FactorSetError):
    """An admin call named a set that is not live."""


class RoutingRefused(FactorSetError):
    """A routing change (or a load or retirement) would take ground from automatic routing."""


class WorkerSetError(RuntimeError):
    """A worker could not take a set; nothing changed (the other ranks dropped it again)."""


class Workers(Protocol):
    """The engine's workers, as the catalogue needs them (one result per rank)."""

    async def load(self, data: dict[str, Any]) -> list[dict[str, Any]]: ...

    async def release(self, label: str) -> None: ...

    async def status(self) -> list[dict[str, Any]]: ...


class SetCatalogue:
    """History, live table and in-flight counts of the sets, and their lifecycle (load, rollback, retire)."""

    def __init__(
        self,
        workers: Workers,
        model: ModelRope,
        sets: list[FactorSet],
        max_model_len: int,
        registry: Registry | None = None,
    ) -> None:
        self.workers = workers
        self.registry = registry
        self.history: dict[str, dict[int, FactorSet]] = {fs.name: {fs.version or 1: fs} for fs in sets}
        self.model_rope = model
        self.max_model_len = max_model_len
        explicit = registry.read_state().explicit if registry is not None else []
        self.table = SetTable(tuple(sets), frozenset(explicit))
        if not self.table.auto:
            raise FactorSetError(
                f"no live set is left for automatic routing ({self.table.describe()}); edit the registry's"
                " live.json so that 'explicit' leaves at least one live name out"
            )
        self.in_flight: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.retired_keys: set[str] = set()
        self._admin_lock = asyncio.Lock()
        metrics.publish_live_sets(list(self.table.sets))

    def restore_history(self) -> None:
        """Add the registry's other versions of the live names (so they can be rolled back to)."""
        if self.registry is None:
            return
        for fs in self.table.sets:
            for version in self.registry.versions(fs.name):
                if version != fs.version:
                    try:
                        self.history[fs.name][version] = self.registry.load_version(fs.name, version)
                    except FactorSetError as err:
                        logger.error("REGISTRY: %s (rollback to it will not be possible)", err)

    # -- requests on versions
    def count(self, assignment: Assignment) -> None:
        """Count a request on its set version (admission, or an upgrade's move)."""
        self.in_flight[assignment.key] += 1
        self.served[assignment.key] += 1

    async def end_admission(self, assignment: Assignment) -> None:
        """The request of an admission is over (or never reached the engine): stop counting it on its
        version, and drop a retired version from the workers after its last request."""
        if assignment.ended:
            return
        assignment.ended = True
        key = assignment.key
        self.in_flight[key] -= 1
        if self.in_flight[key] <= 0:
            del self.in_flight[key]
            if key in self.retired_keys:
                async with self._admin_lock:
                    await self._release(key)

    # -- hot-load, rollback, retire (admin)
    def validate_new_set(self, fs: FactorSet) -> None:
        """Everything a load checks before touching any state."""
        check_compatible(fs, self.model_rope)
        if fs.max_len > self.max_model_len:
            raise FactorSetError(
                f"set {fs.name!r} has window {fs.max_len}, but this engine serves at most {self.max_model_len}"
                " tokens (restart with a larger --max-model-len to serve it)"
            )
        known = self._latest_version(fs.name)
        if fs.version is not None and fs.version <= known:
            raise FactorSetError(
                f"set {fs.name!r} version {fs.version} is not newer than version {known}, which already exists;"
                f" omit version to get {known + 1}"
            )

    def _latest_version(self, name: str) -> int:
        """The highest version of a name on record (memory or registry), 0 for a new name."""
        known = max(self.history.get(name, {}), default=0)
        if self.registry is not None:
            known = max(known, self.registry.latest_version(name))
        return known

    def _registry_lock(self) -> contextlib.AbstractAsyncContextManager:
        """The registry's cross-process lock (replicas share the folder), or nothing without a registry."""
        return self.registry.exclusive() if self.registry is not None else contextlib.nullcontext()

    def live_set(self, name: str) -> FactorSet:
        """The live version of a name (UnknownSetError naming the live ones)."""
        current = self.table.get(name)
        if current is None:
            raise UnknownSetError(f"no live set named {name!r}; live: {self.table.describe()}")
        return current

    def check_load_routing(self, sets: list[FactorSet], routing: Routing | None) -> None:
        """Refuse (:class:`RoutingRefused`) loading ``sets`` with routing ``explicit`` when that would take a
        live ``auto`` name away from automatic routing that it needs (routing None or ``auto``: nothing to
        check — the name keeps or gains automatic routing)."""
        if routing != "explicit":
            return
        after = self.table
        for fs in sets:
            after = after.with_routing(fs.name, "explicit")
        loss = self.table.routing_loss(after)
        if loss is not None:
            names = ", ".join(
                fs.name for fs in sets if self.table.routing(fs.name) == "auto" and self.table.get(fs.name)
            )
            raise RoutingRefused(
                f"loading {names} with routing explicit would take it out of automatic routing and leave {loss};"
                " load the new set under another name to A/B it, or promote another set first"
            )

    async def load_set(self, fs: FactorSet, routing: Routing | None = None) -> FactorSet:
        """Validate, persist, push to every worker, then swap the table. A set with an existing name
        becomes its next version; requests already admitted keep the version they started with.
        ``routing`` None: a new name is ``auto``, an existing one keeps its routing."""
        t0 = time.monotonic()
        try:
            self.validate_new_set(fs)
            self.check_load_routing([fs], routing)
            async with self._admin_lock, self._registry_lock():
                self.validate_new_set(fs)  # again, under the locks (another load may have won the race)
                self.check_load_routing([fs], routing)
                versioned = fs.with_updates(version=fs.version or self._latest_version(fs.name) + 1)
                saved = self.registry.save_version(versioned) if self.registry is not None else None
                try:
                    await self._activate(versioned, routing=routing)
                except BaseException:
                    if saved is not None:
                        saved.unlink(missing_ok=True)
                    raise
                self.history.setdefault(versioned.name, {})[versioned.version or 1] = versioned
        except BaseException:
            metrics.HOT_LOADS.labels("load", "rejected").inc()
            raise
        metrics.HOT_LOADS.labels("load", "ok").inc()
        metrics.HOT_LOAD_SECONDS.observe(time.monotonic() - t0)
        logger.info(
            "hot-loaded %s (window %d, routing %s) in %.3f s",
            versioned.label,
            versioned.max_len,
            self.table.routing(versioned.name),
            time.monotonic() - t0,
        )
        return versioned

    async def rollback_set(self, name: str) -> FactorSet:
        """Make the version before the live one live again."""
        async with self._admin_lock, self._registry_lock():
            current = self.live_set(name)
            older = sorted(v for v in self.history.get(name, {}) if v < (current.version or 1))
            if not older:
                raise FactorSetError(f"{current.label} has no earlier version to roll back to")
            previous = self.history[name][older[-1]]
            await self._activate(previous)
        metrics.HOT_LOADS.labels("rollback", "ok").inc()
        logger.info("rolled %s back to %s", current.label, previous.label)
        return previous

    async def retire_set(self, name: str) -> FactorSet:
        """Stop admitting requests to a set; refused if it is the only set reaching its window."""
        async with self._admin_lock, self._registry_lock():
            current = self.live_set(name)
            rest = self.table.without(name)
            if not rest.sets:
                raise FactorSetError(f"{name!r} is the last live set; load another before retiring it")
            loss = self.table.routing_loss(rest)
            if loss is not None:
                raise RoutingRefused(
                    f"retiring {current.label} would leave {loss}; load or promote another set with a window of"
                    f" {current.max_len} tokens before retiring it"
                )
            self._persist_state(name, retired=True)
            self.table = rest
            await self._retire(current.label)
        metrics.HOT_LOADS.labels("retire", "ok").inc()
        metrics.publish_live_sets(list(self.table.sets))
        return current

    async def _push_to_workers(self, fs: FactorSet) -> None:
        """Give every worker (every rank) the set; if one cannot take it, undo it on the others and raise
        WorkerSetError naming the cause."""
        try:
            results = await self.workers.load(fs.model_dump(mode="json"))
        except Exception as err:  # the call itself failed (engine stopped, an rpc error)
            raise WorkerSetError(f"the engine could not load {fs.label} into its workers: {err}") from err
        failures = [r.get("error", "unknown error") for r in results if not r.get("ok", False)]
        if not failures:
            return
        if any(r.get("loaded") for r in results):
            await self.workers.release(fs.label)
        raise WorkerSetError(
            f"a worker could not take {fs.label}: {failures[0]}"
            + (f" ({len(failures)} of {len(results)} workers failed)" if len(results) > 1 else "")
            + "; nothing was changed"
        )

    async def set_routing(self, name: str, routing: Routing) -> FactorSet:
        """Promote a live set to ``auto`` (automatic routing may pick it) or demote it to ``explicit`` (only
        requests naming it get it). Requests already admitted are not affected. Setting the routing a set
        already has changes nothing."""
        async with self._admin_lock, self._registry_lock():
            current = self.live_set(name)
            before = self.table.routing(name)
            if before != routing:
                after = self.table.with_routing(name, routing)
                loss = self.table.routing_loss(after)
                if loss is not None:
                    raise RoutingRefused(
                        f"demoting {current.label} would leave {loss}; promote or load another set with a window"
                        f" of {current.max_len} tokens first"
                    )
                self._persist_state(name, routing=routing)
                self.table = after
        if before != routing:
            metrics.HOT_LOADS.labels("routing", "ok").inc()
            logger.info("routing of %s: %s -> %s", current.label, before, routing)
        return current

    async def _activate(self, fs: FactorSet, persist: bool = True, routing: Routing | None = None) -> None:
        """Write the set into every worker, then swap it into the table with ``routing`` (None: the name's
        own; caller holds the lock)."""
        await self._push_to_workers(fs)
        current = self.table.get(fs.name)
        if persist:
            try:
                self._persist_state(fs.name, version=fs.version or 1, routing=routing)
            except BaseException:
                # the registry still names the old version live: so must this server; free the new rows
                if current is None or current.label != fs.label:
                    await self.workers.release(fs.label)
                raise
        self.retired_keys.discard(fs.label)
        self.table = self.table.with_set(fs, routing)
        metrics.publish_live_sets(list(self.table.sets))
        if current is not None and current.label != fs.label:
            await self._retire(current.label)

    def _persist_state(
        self, name: str, version: int | None = None, retired: bool = False, routing: Routing | None = None
    ) -> None:
        """Record one name's change in ``live.json`` (read-modify-write of that name only, so replicas
        sharing the registry do not undo each other's changes to other names)."""
        if self.registry is None:
            return
        state = self.registry.read_state()
        if retired:
            state.live.pop(name, None)
            state.retired.append(name)
        elif version is not None:
            state.live[name] = version
        if routing == "explicit":
            state.explicit.append(name)
        elif routing == "auto":
            state.explicit = [n for n in state.explicit if n != name]
        state.retired = [n for n in state.retired if n not in state.live]
        self.registry.write_state(state)

    # -- replicas sharing one registry
    async def sync_from_registry(self) -> list[str]:
        """Serve what the shared registry says is live: activate versions another replica loaded or rolled
        back to, retire names it retired. Nothing is written. Returns what changed (for the log)."""
        if self.registry is None:
            return []
        changes: list[str] = []
        async with self._admin_lock:
            state = self.registry.read_state()
            for name, version in sorted(state.live.items()):
                current = self.table.get(name)
                if current is not None and current.version == version:
                    continue
                try:
                    fs = self.history.get(name, {}).get(version) or self.registry.load_version(name, version)
                    check_compatible(fs, self.model_rope)
                    if fs.max_len > self.max_model_len:
                        raise FactorSetError(f"window {fs.max_len} > this engine's {self.max_model_len} tokens")
                    await self._activate(fs, persist=False, routing="explicit" if name in state.explicit else "auto")
                except (FactorSetError, OSError, WorkerSetError) as err:
                    logger.error("REGISTRY SYNC: cannot serve %s@%d from the shared registry: %s", name, version, err)
                    metrics.HOT_LOADS.labels("sync", "rejected").inc()
                    continue
                self.history.setdefault(name, {})[version] = fs
                changes.append(f"{current.label if current else name} -> {fs.label}")
            for name in state.retired:
                current = self.table.get(name)
                rest = self.table.without(name)
                if current is None or name in state.live or not rest.sets or self.table.routing_loss(rest):
                    continue
                self.table = rest
                await self._retire(current.label)
                changes.append(f"{current.label} retired")
            changes += self._sync_routing(state.explicit)
        if changes:
            metrics.HOT_LOADS.labels("sync", "ok").inc(len(changes))
            metrics.publish_live_sets(list(self.table.sets))
            logger.info("registry sync: %s", "; ".join(changes))
        return changes

    def _sync_routing(self, explicit: list[str]) -> list[str]:
        """Take the registry's routing for the live names (another replica promoted or demoted them), unless
        it would leave no ``auto`` set here. Returns what changed."""
        after = SetTable(self.table.sets, frozenset(explicit))
        if after.explicit == self.table.explicit:
            return []
        if not after.auto:
            logger.error("REGISTRY SYNC: the registry's routing leaves no auto set here (%s); kept", after.describe())
            return []
        changed = sorted(after.explicit ^ self.table.explicit)
        self.table = after
        return [f"{name} routing -> {after.routing(name)}" for name in changed]

    async def watch_registry(self, interval: float) -> None:
        """Poll the registry's live pointer every ``interval`` seconds and sync when it changed, so a set
        loaded through any replica sharing the registry is served by all of them."""
        if self.registry is None or interval <= 0:
            return
        live_file = self.registry.root / "live.json"
        last: tuple[int, int] | None = None
        logger.info("watching %s every %.1f s for sets loaded by other replicas", live_file, interval)
        while True:
            await asyncio.sleep(interval)
            try:
                st = live_file.stat()
                seen = (st.st_mtime_ns, st.st_size)
            except OSError:
                continue
            if seen == last:
                continue
            try:
                await self.sync_from_registry()
                last = seen
            except Exception:  # keep watching: a bad moment must not end replica sync for good
                logger.exception("registry sync failed; retrying in %.1f s", interval)

    async def _retire(self, key: str) -> None:
        """Mark a version retired; its rows are released once no admitted request uses it (lock held)."""
        self.retired_keys.add(key)
        await self._release(key)

    async def _release(self, key: str) -> None:
        """Tell the workers to free a retired version's rows, unless it is in use or live again. Called
        with the admin lock held, so release and (re)load messages reach the workers in order."""
        if key not in self.retired_keys or self.in_flight.get(key, 0) > 0:
            return
        if any(fs.label == key for fs in self.table.sets):
            self.retired_keys.discard(key)
            return
        self.retired_keys.discard(key)
        await self.workers.release(key)

    async def worker_status(self) -> list[dict[str, Any]]:
        return await self.workers.status()

    async def rope_status(self) -> dict[str, Any]:
        """The workers' RoPE memory (the largest of the ranks): per-step buffers plus one slot per version."""
        ranks = await self.worker_status()
        return {
            "state_bytes": max(r["rope_bytes"] for r in ranks),
            "step_tokens": ranks[0]["step_tokens"],
            "versions_held": max(len(r["slots"]) for r in ranks),
            "workers": len(ranks),
        }
