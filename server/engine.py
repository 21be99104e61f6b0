"""The LongRoPE engine: a vLLM ``AsyncLLM`` whose requests each carry their own factor set.

:class:`LongRopeEngine` is a drop-in engine client: vLLM's OpenAI serving layer (and the tests) call its
``generate`` as they would ``AsyncLLM.generate``; it takes the request's set from its admission
(:mod:`server.admission`), writes the set's
``name@version`` into ``SamplingParams.extra_args`` and the prompt's ``cache_salt``, caps generation at the
set's window, runs an upgraded request's phases (:mod:`server.phases`), and counts requests per set version
in its catalogue (:mod:`server.catalogue`), so a replaced version is dropped from the workers only after its
last request ends. Everything else is delegated to the wrapped ``AsyncLLM``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from factors.formats import ModelRope
from factors.schema import FactorSet, FactorSetError

from . import metrics
from .admission import Admission
from .catalogue import SetCatalogue, UnknownSetError, WorkerSetError
from .phases import PhaseJoiner, UpgradeRecord
from .policy import AdmissionPolicy, Assignment, RequestTooLong, phase_limit, upgrade_target
from .registry import Registry
from .startup import EngineSettings, plan_engine_args, startup_sets
from .vllm_ext import EXTRA_ARGS_KEY
from .vllm_ext.engine_client import EngineWorkers, check_request_supported, spec_decode_counts, start_async_llm

logger = logging.getLogger("longrope.engine")


class LongRopeEngine(SetCatalogue):
    """Engine client with per-request LongRoPE sets (and their catalogue); delegates the rest to vLLM's
    ``AsyncLLM``."""

    def __init__(
        self,
        engine: Any,
        model: ModelRope,
        sets: list[FactorSet],
        settings: EngineSettings,
        max_model_len: int,
        registry: Registry | None = None,
    ) -> None:
        super().__init__(EngineWorkers(engine), model, sets, max_model_len, registry)
        self.engine = engine
        self.settings = settings
        self.admission = Admission(
            self, AdmissionPolicy(default_reserve=settings.default_reserve, default_policy=settings.policy)
        )
        self.assignments: dict[str, Assignment] = {}
        self.upgrade_log: deque[UpgradeRecord] = deque(maxlen=1000)
        self._engine_ids: dict[str, str] = {}  # request id -> id of the engine request running it now

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
        try:
            for fs in sets:  # not in the engine arguments: they are hashed into the compile-cache key
                await eng._push_to_workers(fs)
        except Exception:
            engine.shutdown()
            raise
        rope = await eng.rope_status()
        logger.info(
            "RoPE state %.2f MiB per worker (%d tokens per step, %d set versions; independent of the windows)",
            rope["state_bytes"] / 2**20,
            rope["step_tokens"],
            rope["versions_held"],
        )
        eng.restore_history()
        return eng

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        """Stop the engine core and workers (vLLM's launcher passes ``timeout=``)."""
        self.engine.shutdown(*args, **kwargs)

    # -- requests
    def assign(
        self,
        prompt_tokens: int,
        max_tokens: int | None,
        policy: str | None = None,
        n: int = 1,
        factor_set: object = None,
    ) -> Assignment:
        """The set a request would get now, the one it names included (see
        :meth:`server.admission.Admission.assign`)."""
        return self.admission.assign(prompt_tokens, max_tokens, policy, n, factor_set)

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
        Its set is the admission made for it at render time over HTTP (:mod:`server.admission`); a request
        given to the engine directly is admitted here. ``requested_max_tokens`` is what the client asked for
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
        assignment = self.admission.claim(prompt["prompt_token_ids"], sampling_params, requested_max_tokens)
        budget = min(assignment.max_tokens, sampling_params.max_tokens or assignment.max_tokens)
        prompt_ids = list(prompt["prompt_token_ids"])
        user_salt = prompt.get("cache_salt")
        joiner = PhaseJoiner(request_id, sampling_params.output_kind)
        current = assignment
        record: UpgradeRecord | None = None
        outcome, started_at, first_token = "error", time.monotonic(), False
        try:
            check_request_supported(sampling_params)
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
                    if output.finished:
                        metrics.observe_spec_decode(current.set.name, *spec_decode_counts(output))
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
        self.count(moved)
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
