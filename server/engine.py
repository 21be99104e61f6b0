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
from factors.formats import ModelRope, check_compatible, load_any, read_model_rope, sets_from_hf_config
from factors.schema import FactorSet, FactorSetError

from .policy import AdmissionPolicy, Assignment, RequestTooLong, SetTable
from .vllm_patch import CONFIG_KEY, EXTENSION_QUALNAME, EXTRA_ARGS_KEY, PATCH_VERSION, VLLM_VERSION_TARGET

logger = logging.getLogger("longrope.engine")

ASSIGNMENT_KEY = "_longrope_assignment"  # an admitted Assignment riding on the prompt dict


# -- where sets come from at start --------------------------------------------------------------------


def expand_set_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders contribute their *.json files (sorted)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(q for q in p.glob("*.json") if q.is_file()))
        elif p.exists():
            out.append(p)
        else:
            raise FactorSetError(f"factor file or folder {p} does not exist")
    return out


def startup_sets(model_dir: str | Path, factor_paths: Iterable[str | Path] = ()) -> tuple[ModelRope, list[FactorSet]]:
    """The sets an engine starts with: the model's own ``longrope`` config (short + long), the given
    factor files, and plain RoPE over the original window when no set's window is that short."""
    model = read_model_rope(model_dir)
    sets: list[FactorSet] = []
    if model.rope_type in ("longrope", "su"):
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        sets.extend(sets_from_hf_config(cfg, source=f"{model_dir}/config.json"))
    for path in expand_set_paths(factor_paths):
        for fs in load_any(path):
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
        self, engine: Any, model: ModelRope, sets: list[FactorSet], settings: EngineSettings, max_model_len: int
    ) -> None:
        self.engine = engine
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
        kwargs = plan_engine_args(settings, model, sets)
        t0 = time.monotonic()
        args = AsyncEngineArgs(model=settings.model, **{k: v for k, v in kwargs.items() if v is not None})
        engine = AsyncLLM.from_engine_args(args)
        logger.info("engine up in %.1f s; sets: %s", time.monotonic() - t0, ", ".join(fs.label for fs in sets))
        return cls(engine, model, sets, settings, kwargs["max_model_len"])

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
        assignment = self.assign(prompt_tokens, max_tokens)
        self.in_flight[assignment.key] += 1
        self.served[assignment.key] += 1
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
        if assignment is None:
            asked = sampling_params.max_tokens if requested_max_tokens == "from-params" else requested_max_tokens
            assignment = self.admit(len(prompt["prompt_token_ids"]), asked)  # raises before anything runs
        key = assignment.key
        try:
            params = sampling_params.clone()
            params.max_tokens = min(assignment.max_tokens, params.max_tokens or assignment.max_tokens)
            params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: key}
            user_salt = prompt.get("cache_salt")
            prompt["cache_salt"] = assignment.cache_salt + (f"|{user_salt}" if user_salt else "")
            self.assignments[request_id] = assignment
            async for output in self.engine.generate(prompt, params, request_id, **kwargs):
                yield output
        finally:
            self.assignments.pop(request_id, None)
            self.in_flight[key] -= 1
            if self.in_flight[key] <= 0:
                del self.in_flight[key]
                if key in self.retired_keys:
                    await self._release(key)

    # -- hot-load
    async def load_set(self, fs: FactorSet) -> FactorSet:
        """Validate, push to every worker, then swap the table. A set with an existing name becomes its
        next version; requests already running keep the version they started with."""
        check_compatible(fs, self.model_rope)
        if fs.max_len > self.max_model_len:
            raise FactorSetError(
                f"set {fs.name!r} has window {fs.max_len}, but this engine serves at most {self.max_model_len}"
                " tokens (restart with a larger --max-model-len to serve it)"
            )
        async with self._admin_lock:
            current = self.table.get(fs.name)
            next_version = (current.version or 0) + 1 if current is not None else 1
            if fs.version is not None and fs.version < next_version:
                raise FactorSetError(
                    f"set {fs.name!r} version {fs.version} is not newer than the live version"
                    f" {next_version - 1}; omit version to get {next_version}"
                )
            versioned = fs.with_updates(version=fs.version or next_version)
            await self.engine.collective_rpc("longrope_load_set", args=(versioned.model_dump(mode="json"),))
            self.table = self.table.with_set(versioned)
            if current is not None:
                await self._retire(current.label)
        logger.info("hot-loaded %s (window %d)", versioned.label, versioned.max_len)
        return versioned

    async def retire_set(self, name: str) -> FactorSet:
        async with self._admin_lock:
            current = self.table.get(name)
            if current is None:
                raise FactorSetError(f"no live set named {name!r}; live: {self.table.describe()}")
            if len(self.table.sets) == 1:
                raise FactorSetError(f"{name!r} is the last live set; load another before retiring it")
            self.table = self.table.without(name)
            await self._retire(current.label)
        return current

    async def _retire(self, key: str) -> None:
        self.retired_keys.add(key)
        if self.in_flight.get(key, 0) == 0:
            await self._release(key)

    async def _release(self, key: str) -> None:
        self.retired_keys.discard(key)
        await self.engine.collective_rpc("longrope_release_set", args=(key,))

    async def worker_status(self) -> list[dict[str, Any]]:
        return await self.engine.collective_rpc("longrope_status")


__all__ = ["EngineSettings", "LongRopeEngine", "RequestTooLong", "startup_sets", "plan_engine_args"]
