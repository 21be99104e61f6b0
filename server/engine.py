"""The LongRoPE engine: a vLLM ``AsyncLLM`` whose requests each carry their own factor set.

:class:`LongRopeEngine` is a drop-in engine client: vLLM's OpenAI serving layer (and the tests) call its
``generate`` as they would ``AsyncLLM.generate``; it assigns the request a set (policy), writes the set's
``name@version`` into ``SamplingParams.extra_args`` and the prompt's ``cache_salt``, caps generation at the
set's window, and counts requests per set version so a replaced version's table rows are freed only
after its last request ends. Everything else is delegated to the wrapped ``AsyncLLM``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factors.baselines import identity_set
from factors.formats import ModelRope, check_compatible, load_set_paths, model_rope_from_config, sets_from_hf_config
from factors.schema import FactorSet, FactorSetError

from . import metrics
from .policy import AdmissionPolicy, Assignment, RequestTooLong, SetTable
from .registry import Registry
from .vllm_patch import CONFIG_KEY, EXTENSION_QUALNAME, EXTRA_ARGS_KEY, PATCH_VERSION, VLLM_VERSION_TARGET

logger = logging.getLogger("longrope.engine")


class UnknownSetError(FactorSetError):
    """An admin call named a set that is not live."""


ASSIGNMENT_KEY = "_longrope_assignment"  # an admitted Assignment riding on the prompt dict


# -- where sets come from at start --------------------------------------------------------------------


def startup_sets(model_dir: str | Path, factor_paths: Iterable[str | Path] = ()) -> tuple[ModelRope, list[FactorSet]]:
    """The sets an engine starts with: the model's own ``longrope`` config (short + long), the given
    factor files, and plain RoPE over the original window when no set's window is that short."""
    config_path = Path(model_dir) / "config.json"
    cfg = json.loads(config_path.read_text())
    model = model_rope_from_config(cfg)
    sets: list[FactorSet] = []
    if model.rope_type in ("longrope", "su"):
        sets.extend(sets_from_hf_config(cfg, source=str(config_path)))
    for fs in load_set_paths(factor_paths):
        check_compatible(fs, model)
        sets.append(fs)
    if not any(fs.max_len <= model.geometry.original_max_len for fs in sets):
        sets.append(identity_set(model.geometry, "original"))
    names = Counter(fs.name for fs in sets)
    dupes = [n for n, c in names.items() if c > 1]
    if dupes:
        raise FactorSetError(f"several start-up sets are named {dupes}; give each set a distinct name")
    return model, [fs if fs.version is not None else fs.with_updates(version=1) for fs in sets]


# -- the engine ---------------------------------------------------------------------------------------


@dataclass
class EngineSettings:
    """What the engine needs beyond vLLM's own arguments."""

    model: str
    factor_paths: list[str] = field(default_factory=list)
    default_reserve: int = 256
    rope_table_rows: int | None = None  # default: twice the start-up sets' windows
    registry_dir: str | None = None  # where loaded sets persist across restarts (None: memory only)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to vLLM's AsyncEngineArgs


def plan_engine_args(settings: EngineSettings, model: ModelRope, sets: list[FactorSet]) -> dict[str, Any]:
    """vLLM engine arguments for these sets: window, table size, plugin config, extension."""
    kwargs = dict(settings.engine_kwargs)
    largest = max(fs.max_len for fs in sets)
    requested = kwargs.get("max_model_len")
    if requested is not None and requested < largest:
        too_big = [fs.label for fs in sets if fs.max_len > requested]
        raise FactorSetError(
            f"--max-model-len {requested} is smaller than the window of {too_big}; raise it to {largest}"
            " or leave it unset (the engine then serves the largest set window)"
        )
    kwargs["max_model_len"] = requested or largest
    if kwargs["max_model_len"] > model.max_position_embeddings:
        # vLLM caps max_model_len at the config's max_position_embeddings; the factor sets are what make
        # the longer window valid, so raise exactly that field for this model (not a global override).
        overrides = dict(kwargs.get("hf_overrides") or {})
        overrides["max_position_embeddings"] = kwargs["max_model_len"]
        kwargs["hf_overrides"] = overrides
        logger.info(
            "model config max_position_embeddings %d < largest set window %d: overriding it for this engine",
            model.max_position_embeddings,
            kwargs["max_model_len"],
        )
    if kwargs.get("speculative_config"):
        raise FactorSetError("speculative decoding is not supported with per-request LongRoPE")
    rows = settings.rope_table_rows or 2 * sum(fs.max_len for fs in sets)
    if rows < sum(fs.max_len for fs in sets):
        raise FactorSetError(
            f"--rope-table-rows {rows} cannot hold the start-up sets ({sum(fs.max_len for fs in sets)} rows)"
        )
    extra = dict(kwargs.get("additional_config") or {})
    extra[CONFIG_KEY] = {
        "patch_version": PATCH_VERSION,
        "vllm_target": VLLM_VERSION_TARGET,
        "capacity_rows": rows,
        "sets": [fs.model_dump(mode="json") for fs in sets],
    }
    kwargs["additional_config"] = extra
    kwargs["worker_extension_cls"] = EXTENSION_QUALNAME
    kwargs.setdefault("served_model_name", None)
    return kwargs


class LongRopeEngine:
    """Engine client with per-request LongRoPE sets; delegates the rest to vLLM's ``AsyncLLM``."""

    def __init__(
        self,
        engine: Any,
        model: ModelRope,
        sets: list[FactorSet],
        settings: EngineSettings,
        max_model_len: int,
        registry: Registry | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.history: dict[str, dict[int, FactorSet]] = {fs.name: {fs.version or 1: fs} for fs in sets}
        self.model_rope = model
        self.settings = settings
        self.max_model_len = max_model_len
        self.policy = AdmissionPolicy(default_reserve=settings.default_reserve)
        self.table = SetTable(tuple(sets))
        self.in_flight: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.retired_keys: set[str] = set()
        self.assignments: dict[str, Assignment] = {}
        self._admin_lock = asyncio.Lock()
        metrics.publish_live_sets(list(self.table.sets))

    # -- construction
    @classmethod
    async def start(cls, settings: EngineSettings) -> LongRopeEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from .vllm_patch import install

        install()  # also done by the plugin entry point in every vLLM process
        # On CUDA, vLLM 0.32 defaults to Model Runner V2, which this patch does not hook; pin the V1 runner
        # (the path the CPU tests prove). Spawned engine processes inherit the environment.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        model, sets = startup_sets(settings.model, settings.factor_paths)
        registry = Registry(settings.registry_dir) if settings.registry_dir else None
        if registry is not None:
            sets = registry.restore(sets)
            if not sets:
                raise FactorSetError(
                    f"the registry {settings.registry_dir} leaves no live set; load one with --factors"
                )
        kwargs = plan_engine_args(settings, model, sets)
        t0 = time.monotonic()
        args = AsyncEngineArgs(model=settings.model, **{k: v for k, v in kwargs.items() if v is not None})
        engine = AsyncLLM.from_engine_args(args)
        logger.info("engine up in %.1f s; sets: %s", time.monotonic() - t0, ", ".join(fs.label for fs in sets))
        eng = cls(engine, model, sets, settings, kwargs["max_model_len"], registry)
        if registry is not None:
            for fs in sets:
                for version in registry.versions(fs.name):
                    if version != fs.version:
                        try:
                            eng.history[fs.name][version] = registry.load_version(fs.name, version)
                        except FactorSetError as err:
                            logger.error("REGISTRY: %s (rollback to it will not be possible)", err)
        return eng

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        """Stop the engine core and workers (vLLM's launcher passes ``timeout=``)."""
        self.engine.shutdown(*args, **kwargs)

    # -- requests
    def assign(self, prompt_tokens: int, max_tokens: int | None) -> Assignment:
        return self.policy.assign(self.table, prompt_tokens, max_tokens)

    def admit(self, prompt_tokens: int, max_tokens: int | None) -> Assignment:
        """Assign a set and count the request on its version from this moment on, so the version's
        table rows cannot be released before the request reaches the engine."""
        try:
            assignment = self.assign(prompt_tokens, max_tokens)
        except RequestTooLong:
            metrics.REJECTIONS.labels("too_long").inc()
            raise
        except ValueError:
            metrics.REJECTIONS.labels("bad_request").inc()
            raise
        self.in_flight[assignment.key] += 1
        self.served[assignment.key] += 1
        fs = assignment.set
        metrics.PROMPT_TOKENS.labels(fs.name, str(fs.version)).observe(prompt_tokens)
        return assignment

    async def generate(
        self,
        prompt: Any,
        sampling_params: Any,
        request_id: str,
        *,
        requested_max_tokens: int | None | str = "from-params",
        **kwargs: Any,
    ) -> AsyncGenerator[Any, None]:
        """``AsyncLLM.generate`` with the request's factor set assigned first.

        ``prompt`` must be tokenised (``{"prompt_token_ids": [...]}``), as vLLM's serving layer passes it.
        It may carry an assignment made earlier by :meth:`admit` (the HTTP layer admits at render time,
        before response headers go out). Otherwise ``requested_max_tokens`` is what the client asked for
        (None: nothing); by default the sampling params' max_tokens counts as asked for.
        """
        if not (isinstance(prompt, dict) and "prompt_token_ids" in prompt):
            raise TypeError("LongRopeEngine.generate needs a tokenised prompt ({'prompt_token_ids': [...]})")
        prompt = dict(prompt)
        assignment: Assignment | None = prompt.pop(ASSIGNMENT_KEY, None)
        if assignment is not None:
            assignment.started = True
        else:
            asked = sampling_params.max_tokens if requested_max_tokens == "from-params" else requested_max_tokens
            assignment = self.admit(len(prompt["prompt_token_ids"]), asked)  # raises before anything runs
        key = assignment.key
        outcome, context = "error", assignment.prompt_tokens
        try:
            params = sampling_params.clone()
            params.max_tokens = min(assignment.max_tokens, params.max_tokens or assignment.max_tokens)
            params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: key}
            user_salt = prompt.get("cache_salt")
            prompt["cache_salt"] = assignment.cache_salt + (f"|{user_salt}" if user_salt else "")
            self.assignments[request_id] = assignment
            async for output in self.engine.generate(prompt, params, request_id, **kwargs):
                context = assignment.prompt_tokens + max((len(o.token_ids) for o in output.outputs), default=0)
                if output.finished:
                    outcome = "finished"
                yield output
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "aborted"
            raise
        finally:
            fs = assignment.set
            metrics.REQUESTS.labels(fs.name, str(fs.version), outcome).inc()
            metrics.CONTEXT_TOKENS.labels(fs.name, str(fs.version)).observe(context)
            self.assignments.pop(request_id, None)
            await self.end_admission(assignment)

    async def end_admission(self, assignment: Assignment) -> None:
        """The request of an admission is over (or never reached the engine): stop counting it on its
        version, and free a retired version's rows after its last request."""
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

    def _live(self, name: str) -> FactorSet:
        current = self.table.get(name)
        if current is None:
            raise UnknownSetError(f"no live set named {name!r}; live: {self.table.describe()}")
        return current

    async def load_set(self, fs: FactorSet) -> FactorSet:
        """Validate, persist, push to every worker, then swap the table. A set with an existing name
        becomes its next version; requests already admitted keep the version they started with."""
        t0 = time.monotonic()
        try:
            self.validate_new_set(fs)
            async with self._admin_lock:
                self.validate_new_set(fs)  # again, under the lock (another load may have won the race)
                versioned = fs.with_updates(version=fs.version or self._latest_version(fs.name) + 1)
                saved = self.registry.save_version(versioned) if self.registry is not None else None
                try:
                    await self._activate(versioned)
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
        logger.info("hot-loaded %s (window %d) in %.3f s", versioned.label, versioned.max_len, time.monotonic() - t0)
        return versioned

    async def rollback_set(self, name: str) -> FactorSet:
        """Make the version before the live one live again."""
        async with self._admin_lock:
            current = self._live(name)
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
        async with self._admin_lock:
            current = self._live(name)
            rest = self.table.without(name)
            if not rest.sets:
                raise FactorSetError(f"{name!r} is the last live set; load another before retiring it")
            if rest.largest_window < current.max_len:
                raise FactorSetError(
                    f"{current.label} is the only set serving {rest.largest_window + 1}–{current.max_len} tokens;"
                    " load another set with a window that large before retiring it"
                )
            self.table = rest
            self._persist_state(retired=name)
            await self._retire(current.label)
        metrics.HOT_LOADS.labels("retire", "ok").inc()
        metrics.publish_live_sets(list(self.table.sets))
        return current

    async def _activate(self, fs: FactorSet) -> None:
        """Write the set into every worker, then swap it into the table (caller holds the lock)."""
        await self.engine.collective_rpc("longrope_load_set", args=(fs.model_dump(mode="json"),))
        self.retired_keys.discard(fs.label)
        current = self.table.get(fs.name)
        self.table = self.table.with_set(fs)
        self._persist_state()
        metrics.publish_live_sets(list(self.table.sets))
        if current is not None and current.label != fs.label:
            await self._retire(current.label)

    def _persist_state(self, retired: str | None = None) -> None:
        if self.registry is None:
            return
        state = self.registry.read_state()
        state.live = {fs.name: fs.version or 1 for fs in self.table.sets}
        if retired is not None:
            state.retired.append(retired)
        state.retired = [n for n in state.retired if n not in state.live]
        self.registry.write_state(state)

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
        await self.engine.collective_rpc("longrope_release_set", args=(key,))

    async def worker_status(self) -> list[dict[str, Any]]:
        return await self.engine.collective_rpc("longrope_status")


__all__ = ["EngineSettings", "LongRopeEngine", "RequestTooLong", "UnknownSetError", "plan_engine_args", "startup_sets"]
