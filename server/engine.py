"""The LongRoPE engine: a vLLM ``AsyncLLM`` whose requests each carry their own factor set.

:class:`LongRopeEngine` is a drop-in engine client: vLLM's OpenAI serving layer (and the tests) call its
``generate`` as they would ``AsyncLLM.generate``; it assigns the request a set (policy), writes the set's
``name@version`` into ``SamplingParams.extra_args`` and the prompt's ``cache_salt``, caps generation at the
set's window, and counts requests per set version so a replaced version is dropped from the workers only
after its last request ends. Everything else is delegated to the wrapped ``AsyncLLM``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factors.baselines import identity_set
from factors.formats import ModelRope, check_compatible, load_set_paths, model_rope_from_config, sets_from_hf_config
from factors.schema import FactorSet, FactorSetError

from . import metrics
from .policy import (
    DEFAULT_POLICY,
    AdmissionPolicy,
    Assignment,
    Policy,
    RequestTooLong,
    SetTable,
    check_policy,
    phase_limit,
    upgrade_target,
)
from .registry import Registry
from .vllm_ext import CONFIG_KEY, EXTENSION_QUALNAME, EXTRA_ARGS_KEY, PATCH_VERSION, POLICY_KEY
from .vllm_ext.engine_client import output_modes, start_async_llm
from .vllm_ext.frontend import ASSIGNMENT_KEY

logger = logging.getLogger("longrope.engine")


class UnknownSetError(FactorSetError):
    """An admin call named a set that is not live."""


class WorkerSetError(RuntimeError):
    """A worker could not take a set; nothing changed (the other ranks dropped it again)."""




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


# -- upgrades: one request, several engine requests -----------------------------------------------


@dataclass
class UpgradeRecord:
    """One move of a request to a larger set (kept in ``LongRopeEngine.upgrade_log`` for tests and logs)."""

    request_id: str
    from_key: str
    to_key: str
    recompute_tokens: int
    at: float
    seconds: float | None = None  # upgrade → first token under the new set
    cached_tokens: int | None = None  # prefix-cache hits of the recompute (0 unless the new set computed it)


class PhaseJoiner:
    """Presents the phases of an upgraded request to vLLM's serving layer as one request.

    vLLM yields outputs in one of three kinds: DELTA (streaming: new tokens only), CUMULATIVE (all tokens so
    far) and FINAL_ONLY (one output at the end). A phase's outputs only know that phase's tokens; this joins
    them: the request id, prompt and prompt logprobs stay the first phase's, cumulative outputs are prefixed
    with the earlier phases' tokens, text and logprobs, and a phase that ends in an upgrade is not reported as
    finished. A request that never moves gets vLLM's outputs unchanged.
    """

    def __init__(self, request_id: str, output_kind: Any) -> None:
        self.request_id = request_id
        self.delta, self.final_only = output_modes(output_kind)
        self.first: Any = None
        self.done_tokens: list[int] = []
        self.done_text = ""
        self.done_logprobs: Any = None
        self.done_cumulative: float | None = None
        self._reset_phase()

    def _reset_phase(self) -> None:
        self.phase_tokens: Any = []  # DELTA: our list of the deltas; otherwise vLLM's cumulative sequence
        self._text_parts: list[str] = []
        self.phase_logprobs: Any = None
        self.phase_cumulative: float | None = None

    @property
    def tokens(self) -> list[int]:
        return [*self.done_tokens, *self.phase_tokens]

    @property
    def phase_text(self) -> str:
        return "".join(self._text_parts)

    @property
    def tokens_in_phase(self) -> int:
        return len(self.phase_tokens)

    def observe(self, output: Any) -> None:
        if self.first is None:
            self.first = output
        if not output.outputs:
            return
        c = output.outputs[0]
        if self.delta:
            # appended in place: a streamed request's outputs must not cost time quadratic in its length
            self.phase_tokens.extend(c.token_ids)
            self._text_parts.append(c.text)
            if c.logprobs is not None:
                if self.phase_logprobs is None:
                    self.phase_logprobs = copy.copy(c.logprobs)
                else:
                    self.phase_logprobs.extend(c.logprobs)
        else:  # each output holds the whole phase so far: keep references, copy nothing
            self.phase_tokens, self._text_parts, self.phase_logprobs = c.token_ids, [c.text], c.logprobs
        self.phase_cumulative = c.cumulative_logprob

    def phase_ended_at_limit(self, output: Any, phase_max: int) -> bool:
        """The phase stopped because it reached its token limit (not a stop token, string or abort)."""
        c = output.outputs[0] if output.outputs else None
        return c is not None and c.finish_reason == "length" and len(self.phase_tokens) >= phase_max

    def next_phase(self) -> None:
        self.done_tokens += self.phase_tokens
        self.done_text += self.phase_text
        self.done_logprobs = _join_logprobs(self.done_logprobs, self.phase_logprobs)
        if self.phase_cumulative is not None:
            self.done_cumulative = (self.done_cumulative or 0.0) + self.phase_cumulative
        self._reset_phase()

    def present(self, output: Any, phase: int, continuing: bool) -> Any:
        """What the consumer sees for this engine output (None: nothing, a FINAL_ONLY phase that goes on)."""
        if phase == 0 and not continuing:
            return output
        if continuing and self.final_only:
            return None
        shown = copy.copy(output)
        completions = []
        for c in output.outputs:
            if not self.delta and phase > 0:
                c = dataclasses.replace(
                    c,
                    token_ids=self.done_tokens + list(c.token_ids),
                    text=self.done_text + c.text,
                    logprobs=_join_logprobs(self.done_logprobs, c.logprobs),
                )
            if phase > 0 and c.cumulative_logprob is not None and self.done_cumulative is not None:
                c = dataclasses.replace(c, cumulative_logprob=self.done_cumulative + c.cumulative_logprob)
            if continuing:
                c = dataclasses.replace(c, finish_reason=None, stop_reason=None)
            completions.append(c)
        shown.outputs = completions
        shown.request_id = self.request_id
        if continuing:
            shown.finished = False
        if phase > 0:
            shown.prompt = self.first.prompt
            shown.prompt_token_ids = self.first.prompt_token_ids
            shown.prompt_logprobs = None if self.delta else self.first.prompt_logprobs
            shown.num_cached_tokens = self.first.num_cached_tokens
        return shown


def _join_logprobs(head: Any, tail: Any) -> Any:
    if head is None:
        return None if tail is None else copy.copy(tail)
    if tail is None:
        return head
    joined = copy.copy(head)
    joined.extend(tail)
    return joined


# -- the engine ---------------------------------------------------------------------------------------


@dataclass
class EngineSettings:
    """What the engine needs beyond vLLM's own arguments."""

    model: str
    factor_paths: list[str] = field(default_factory=list)
    default_reserve: int = 256
    policy: Policy = DEFAULT_POLICY
    registry_dir: str | None = None  # where loaded sets persist across restarts (None: memory only)
    # vLLM's worker_extension_cls: ours, or a subclass of it (qualified name) that adds worker methods
    worker_extension: str = EXTENSION_QUALNAME
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to vLLM's AsyncEngineArgs


def plan_engine_args(settings: EngineSettings, model: ModelRope, sets: list[FactorSet]) -> dict[str, Any]:
    """vLLM engine arguments for these sets: window, plugin config, extension."""
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
    extra = dict(kwargs.get("additional_config") or {})
    extra[CONFIG_KEY] = {
        "patch_version": PATCH_VERSION,
        "sets": [fs.model_dump(mode="json") for fs in sets],
    }
    kwargs["additional_config"] = extra
    kwargs["worker_extension_cls"] = settings.worker_extension
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
        self.policy = AdmissionPolicy(default_reserve=settings.default_reserve, default_policy=settings.policy)
        self.table = SetTable(tuple(sets))
        self.in_flight: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.retired_keys: set[str] = set()
        self.assignments: dict[str, Assignment] = {}
        self.upgrade_log: deque[UpgradeRecord] = deque(maxlen=1000)
        self._engine_ids: dict[str, str] = {}  # request id -> id of the engine request running it now
        self._admin_lock = asyncio.Lock()
        metrics.publish_live_sets(list(self.table.sets))

    # -- construction
    @classmethod
    async def start(cls, settings: EngineSettings) -> LongRopeEngine:
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
        engine = start_async_llm(settings.model, kwargs)
        logger.info("engine up in %.1f s; sets: %s", time.monotonic() - t0, ", ".join(fs.label for fs in sets))
        eng = cls(engine, model, sets, settings, kwargs["max_model_len"], registry)
        rope = await eng.rope_status()
        logger.info(
            "RoPE state %.2f MiB per worker (%d tokens per step, %d set versions; independent of the windows)",
            rope["state_bytes"] / 2**20,
            rope["step_tokens"],
            rope["versions_held"],
        )
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
    def assign(self, prompt_tokens: int, max_tokens: int | None, policy: str | None = None, n: int = 1) -> Assignment:
        policy = check_policy(policy) if policy is not None else self.policy.default_policy
        if n > 1 and policy == "upgrade":
            # Several choices would outgrow the window at different tokens; admit them on the budget instead.
            policy = "reserve"
        return self.policy.assign(self.table, prompt_tokens, max_tokens, policy)

    def admit(self, prompt_tokens: int, max_tokens: int | None, policy: str | None = None, n: int = 1) -> Assignment:
        """Assign a set and count the request on its version from this moment on, so the version's
        table rows cannot be released before the request reaches the engine."""
        try:
            assignment = self.assign(prompt_tokens, max_tokens, policy, n)
        except RequestTooLong:
            metrics.REJECTIONS.labels("too_long").inc()
            raise
        except ValueError:
            metrics.REJECTIONS.labels("bad_request").inc()
            raise
        self._count(assignment)
        fs = assignment.set
        metrics.PROMPT_TOKENS.labels(fs.name, str(fs.version)).observe(prompt_tokens)
        return assignment

    def _count(self, assignment: Assignment) -> None:
        self.in_flight[assignment.key] += 1
        self.served[assignment.key] += 1

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
        (None: nothing); by default the sampling params' max_tokens counts as asked for, and the policy is
        ``extra_args["longrope_policy"]`` or the engine's default.

        Under the ``upgrade`` policy a request runs in phases: when it reaches its set's limit
        (:func:`~server.policy.phase_limit`), the phase ends and a new engine request continues it under the
        smallest larger set, its prompt being the original prompt plus every token generated so far — so its
        KV cache is recomputed under the new set, with the new set's ``cache_salt``. The consumer sees one
        request (:class:`PhaseJoiner`).
        """
        if not (isinstance(prompt, dict) and "prompt_token_ids" in prompt):
            raise TypeError("LongRopeEngine.generate needs a tokenised prompt ({'prompt_token_ids': [...]})")
        prompt = dict(prompt)
        assignment: Assignment | None = prompt.pop(ASSIGNMENT_KEY, None)
        if assignment is not None:
            assignment.started = True
        else:
            asked = sampling_params.max_tokens if requested_max_tokens == "from-params" else requested_max_tokens
            policy = (sampling_params.extra_args or {}).get(POLICY_KEY)
            n = getattr(sampling_params, "n", 1) or 1
            assignment = self.admit(len(prompt["prompt_token_ids"]), asked, policy, n)  # raises before anything runs
        budget = min(assignment.max_tokens, sampling_params.max_tokens or assignment.max_tokens)
        prompt_ids = list(prompt["prompt_token_ids"])
        user_salt = prompt.get("cache_salt")
        joiner = PhaseJoiner(request_id, sampling_params.output_kind)
        current = assignment
        record: UpgradeRecord | None = None
        outcome, started_at, first_token = "error", time.monotonic(), False
        try:
            phase = 0
            while True:
                done = len(joiner.tokens)
                limit, can_move = phase_limit(current, self.table, len(prompt_ids) + done)
                phase_max = min(budget - done, limit)
                may_move = can_move and limit < budget - done
                params = sampling_params.clone()
                params.max_tokens = phase_max
                params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: current.key}
                phase_prompt = dict(prompt)
                phase_prompt["cache_salt"] = current.cache_salt + (f"|{user_salt}" if user_salt else "")
                phase_kwargs = kwargs
                if phase > 0:
                    phase_prompt.pop("prompt", None)
                    phase_prompt["prompt_token_ids"] = prompt_ids + joiner.tokens
                    params.prompt_logprobs = None
                    params.min_tokens = max(0, (sampling_params.min_tokens or 0) - done)
                    phase_kwargs = {k: v for k, v in kwargs.items() if k != "prompt_text"}
                engine_id = request_id if phase == 0 else f"{request_id}-up{phase}"
                self._engine_ids[request_id] = engine_id
                self.assignments[request_id] = current
                move_to: FactorSet | None = None
                async for output in self.engine.generate(phase_prompt, params, engine_id, **phase_kwargs):
                    joiner.observe(output)
                    if joiner.tokens_in_phase and record is not None and record.seconds is None:
                        record.seconds = time.monotonic() - record.at
                        record.cached_tokens = output.num_cached_tokens
                        metrics.UPGRADE_RECOMPUTE_SECONDS.observe(record.seconds)
                    if not first_token and joiner.tokens_in_phase:
                        first_token = True
                        metrics.TIME_TO_FIRST_TOKEN.labels(assignment.set.name).observe(time.monotonic() - started_at)
                    if output.finished and may_move and joiner.phase_ended_at_limit(output, phase_max):
                        move_to = self._move_target(current, len(prompt_ids) + len(joiner.tokens))
                    shown = joiner.present(output, phase, continuing=move_to is not None)
                    if shown is not None:
                        yield shown
                if move_to is None:
                    outcome = "finished"
                    break
                current, record = await self._upgrade(
                    request_id, current, move_to, len(prompt_ids) + len(joiner.tokens)
                )
                joiner.next_phase()
                phase += 1
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "aborted"
            raise
        finally:
            fs = current.set
            metrics.REQUESTS.labels(fs.name, str(fs.version), outcome).inc()
            metrics.CONTEXT_TOKENS.labels(fs.name, str(fs.version)).observe(len(prompt_ids) + len(joiner.tokens))
            metrics.REQUEST_LATENCY.labels(fs.name).observe(time.monotonic() - started_at)
            self.assignments.pop(request_id, None)
            self._engine_ids.pop(request_id, None)
            for phase_assignment in assignment.chain():
                await self.end_admission(phase_assignment)

    def _move_target(self, current: Assignment, seq_len: int) -> FactorSet | None:
        """The set a request of ``seq_len`` tokens moves to when it outgrows ``current`` (None: stop here).
        The live table decides: a set hot-loaded or retired meanwhile counts, and the target must leave room
        for at least one more token."""
        target = upgrade_target(self.table, seq_len)
        if target is None or target.max_len <= current.set.max_len:
            return None
        trial = dataclasses.replace(current, set=target, upgraded_to=None)
        return target if phase_limit(trial, self.table, seq_len)[0] >= 1 else None

    async def _upgrade(
        self, request_id: str, current: Assignment, target: FactorSet, seq_len: int
    ) -> tuple[Assignment, UpgradeRecord]:
        """Move a request to a larger set: count it there, end its count on the old version (whose rows
        may then be freed), record and log the move. The caller recomputes the cache under the new set."""
        moved = dataclasses.replace(current, set=target, started=True, ended=False, upgraded_to=None)
        self._count(moved)
        current.upgraded_to = moved
        await self.end_admission(current)
        record = UpgradeRecord(request_id, current.key, moved.key, seq_len, time.monotonic())
        self.upgrade_log.append(record)
        metrics.UPGRADES.labels(current.set.name, target.name).inc()
        metrics.UPGRADE_RECOMPUTE_TOKENS.inc(seq_len)
        logger.info(
            "request %s outgrew %s (window %d) at %d tokens: moving to %s, recomputing its %d tokens",
            request_id,
            current.key,
            current.set.max_len,
            seq_len,
            moved.key,
            seq_len,
        )
        return moved, record

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        """Abort requests by the ids their callers know (an upgraded request runs under another id)."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        await self.engine.abort([self._engine_ids.get(r, r) for r in ids], internal)

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

    def _registry_lock(self) -> contextlib.AbstractAsyncContextManager:
        """The registry's cross-process lock (replicas share the folder), or nothing without a registry."""
        return self.registry.exclusive() if self.registry is not None else contextlib.nullcontext()

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
            async with self._admin_lock, self._registry_lock():
                self.validate_new_set(fs)  # again, under the locks (another load may have won the race)
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
        async with self._admin_lock, self._registry_lock():
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
        async with self._admin_lock, self._registry_lock():
            current = self._live(name)
            rest = self.table.without(name)
            if not rest.sets:
                raise FactorSetError(f"{name!r} is the last live set; load another before retiring it")
            if rest.largest_window < current.max_len:
                raise FactorSetError(
                    f"{current.label} is the only set serving {rest.largest_window + 1}–{current.max_len} tokens;"
                    " load another set with a window that large before retiring it"
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
            results = await self.engine.collective_rpc("longrope_load_set", args=(fs.model_dump(mode="json"),))
        except Exception as err:  # the call itself failed (engine stopped, an rpc error)
            raise WorkerSetError(f"the engine could not load {fs.label} into its workers: {err}") from err
        failures = [r.get("error", "unknown error") for r in results if not r.get("ok", False)]
        if not failures:
            return
        if any(r.get("loaded") for r in results):
            await self.engine.collective_rpc("longrope_release_set", args=(fs.label,))
        raise WorkerSetError(
            f"a worker could not take {fs.label}: {failures[0]}"
            + (f" ({len(failures)} of {len(results)} workers failed)" if len(results) > 1 else "")
            + "; nothing was changed"
        )

    async def _activate(self, fs: FactorSet, persist: bool = True) -> None:
        """Write the set into every worker, then swap it into the table (caller holds the lock)."""
        await self._push_to_workers(fs)
        current = self.table.get(fs.name)
        if persist:
            try:
                self._persist_state(fs.name, version=fs.version or 1)
            except BaseException:
                # the registry still names the old version live: so must this server; free the new rows
                if current is None or current.label != fs.label:
                    await self.engine.collective_rpc("longrope_release_set", args=(fs.label,))
                raise
        self.retired_keys.discard(fs.label)
        self.table = self.table.with_set(fs)
        metrics.publish_live_sets(list(self.table.sets))
        if current is not None and current.label != fs.label:
            await self._retire(current.label)

    def _persist_state(self, name: str, version: int | None = None, retired: bool = False) -> None:
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
                    await self._activate(fs, persist=False)
                except (FactorSetError, OSError, WorkerSetError) as err:
                    logger.error("REGISTRY SYNC: cannot serve %s@%d from the shared registry: %s", name, version, err)
                    metrics.HOT_LOADS.labels("sync", "rejected").inc()
                    continue
                self.history.setdefault(name, {})[version] = fs
                changes.append(f"{current.label if current else name} -> {fs.label}")
            for name in state.retired:
                current = self.table.get(name)
                rest = self.table.without(name)
                if current is None or name in state.live or not rest.sets or rest.largest_window < current.max_len:
                    continue
                self.table = rest
                await self._retire(current.label)
                changes.append(f"{current.label} retired")
        if changes:
            metrics.HOT_LOADS.labels("sync", "ok").inc(len(changes))
            metrics.publish_live_sets(list(self.table.sets))
            logger.info("registry sync: %s", "; ".join(changes))
        return changes

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
        await self.engine.collective_rpc("longrope_release_set", args=(key,))

    async def worker_status(self) -> list[dict[str, Any]]:
        return await self.engine.collective_rpc("longrope_status")

    async def rope_status(self) -> dict[str, Any]:
        """The workers' RoPE memory (the largest of the ranks): per-step buffers plus one slot per version."""
        ranks = await self.worker_status()
        return {
            "state_bytes": max(r["rope_bytes"] for r in ranks),
            "step_tokens": ranks[0]["step_tokens"],
            "versions_held": max(len(r["slots"]) for r in ranks),
            "workers": len(ranks),
        }


__all__ = [
    "EngineSettings",
    "LongRopeEngine",
    "PhaseJoiner",
    "UpgradeRecord",
    "RequestTooLong",
    "UnknownSetError",
    "WorkerSetError",
    "plan_engine_args",
    "startup_sets",
]
