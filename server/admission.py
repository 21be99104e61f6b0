"""Admission: the one place where a request gets its factor set, and is counted on that set's version.

A request is admitted exactly once:

- over HTTP, as soon as vLLM has tokenised its prompts (the render hook of :mod:`server.vllm_ext.frontend`
  calls :meth:`Admission.admit_prompts`), so a request no window holds gets OpenAI's 400 and an admitted one
  can name its set in the response headers before they go out. The admissions are kept in the HTTP
  request's scope (:meth:`Admission.http_request`, entered by the response middleware), not in vLLM's data;
- the engine's ``generate`` then *claims* the admission of its prompt from that scope
  (:meth:`Admission.claim`); only a request given to the engine directly (no HTTP scope, or a prompt the
  scope never saw) is admitted there.

Which set: the one a request names (``vllm_xargs: {"longrope_factor_set": NAME}``), pinned, whatever its
routing (:meth:`server.policy.AdmissionPolicy.assign_named`); otherwise automatic routing over the ``auto``
sets.

Whatever was admitted but never reached the engine (a later validation refused it) is ended when the HTTP
request's scope closes, so no version stays counted by a request that does not exist.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import metrics
from .policy import AdmissionPolicy, Assignment, RequestTooLong, check_policy
from .protocol import FACTOR_SET_XARG
from .vllm_ext import POLICY_KEY

if TYPE_CHECKING:
    from .catalogue import SetCatalogue


@dataclass
class HttpAdmissions:
    """The admissions made while one HTTP request is handled: all of them (the response names their sets)
    and those whose prompt the engine has not claimed yet."""

    admitted: list[Assignment] = field(default_factory=list)
    unclaimed: list[tuple[Sequence[int], Assignment]] = field(default_factory=list)

    def take(self, prompt_ids: Sequence[int]) -> Assignment | None:
        """The admission made for this prompt (the same token list, or an equal one: equal prompts of one
        request get the same set), removed from the unclaimed."""
        for i, (ids, assignment) in enumerate(self.unclaimed):
            if ids is prompt_ids or ids == prompt_ids:
                del self.unclaimed[i]
                return assignment
        return None


# The HTTP request being handled (a mutable holder, so what the handler's tasks add is seen by the middleware
# however the context is copied into them).
_current: contextvars.ContextVar[HttpAdmissions | None] = contextvars.ContextVar("longrope_http", default=None)


class Admission:
    """Assigns sets by the policy over the catalogue's live table and counts each admission on its version."""

    def __init__(self, catalogue: SetCatalogue, policy: AdmissionPolicy) -> None:
        self.catalogue = catalogue
        self.policy = policy

    def assign(
        self,
        prompt_tokens: int,
        max_tokens: int | None,
        policy: str | None = None,
        n: int = 1,
        factor_set: object = None,
    ) -> Assignment:
        """The set a request would get now (nothing is counted): the one it names (``factor_set``, pinned), else
        automatic routing's. ValueError: too long, an unknown set, or a bad policy."""
        if factor_set is not None:
            return self.policy.assign_named(self.catalogue.table, factor_set, prompt_tokens, max_tokens, policy)
        policy = check_policy(policy) if policy is not None else self.policy.default_policy
        if n > 1 and policy == "upgrade":
            # Several choices would outgrow the window at different tokens; admit them on the budget instead.
            policy = "reserve"
        return self.policy.assign(self.catalogue.table, prompt_tokens, max_tokens, policy)

    def admit(
        self,
        prompt_tokens: int,
        max_tokens: int | None,
        policy: str | None = None,
        n: int = 1,
        factor_set: object = None,
    ) -> Assignment:
        """Assign a set and count the request on its version from this moment on, so the version cannot be
        dropped from the workers before the request reaches the engine."""
        try:
            assignment = self.assign(prompt_tokens, max_tokens, policy, n, factor_set)
        except RequestTooLong:
            metrics.REJECTIONS.labels("too_long").inc()
            raise
        except ValueError:
            metrics.REJECTIONS.labels("bad_request").inc()
            raise
        self.catalogue.count(assignment)
        fs = assignment.set
        metrics.PROMPT_TOKENS.labels(fs.name, str(fs.version)).observe(prompt_tokens)
        return assignment

    # -- over HTTP
    def admit_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int | None,
        policy: str | None,
        n: int,
        factor_set: object = None,
    ) -> None:
        """Admit every tokenised prompt of the HTTP request being handled (ValueError when one cannot be;
        the admissions made before it are ended with the request's scope). ``factor_set``: the set the
        request names (``vllm_xargs``), None for automatic routing."""
        scope = _current.get()
        for ids in prompts:
            assignment = self.admit(len(ids), max_tokens, policy, n, factor_set)
            if scope is not None:
                scope.admitted.append(assignment)
                scope.unclaimed.append((ids, assignment))

    @asynccontextmanager
    async def http_request(self) -> AsyncIterator[HttpAdmissions]:
        """The scope of one HTTP request's admissions; on exit, ends those that never reached the engine."""
        scope = HttpAdmissions()
        token = _current.set(scope)
        try:
            yield scope
        finally:
            _current.reset(token)
            for assignment in scope.admitted:
                if not assignment.started:
                    await self.catalogue.end_admission(assignment)

    # -- in the engine
    def claim(
        self, prompt_ids: Sequence[int], sampling_params: Any, requested_max_tokens: int | None | str
    ) -> Assignment:
        """The admission of the prompt ``generate`` is about to run, marked started: the one made at render
        time for this prompt, else a new one (direct engine use). ``requested_max_tokens``: what the client
        asked for (None: nothing); ``"from-params"`` takes the sampling params' max_tokens as asked for."""
        scope = _current.get()
        assignment = scope.take(prompt_ids) if scope is not None else None
        if assignment is None:
            asked = sampling_params.max_tokens if requested_max_tokens == "from-params" else requested_max_tokens
            extra = sampling_params.extra_args or {}
            n = getattr(sampling_params, "n", 1) or 1
            # raises before anything runs
            assignment = self.admit(len(prompt_ids), asked, extra.get(POLICY_KEY), n, extra.get(FACTOR_SET_XARG))
        assignment.started = True
        return assignment
