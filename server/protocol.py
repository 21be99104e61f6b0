"""longrope-serve's wire protocol: header and body field names, per-request ``vllm_xargs`` keys and the admin
API's JSON shapes, defined once for the server and its clients.

Pydantic only (no torch, no vLLM), so ``clients/`` imports it cheaply; the admin routes declare these models
as ``response_model``, so ``/openapi.json`` documents the real shapes.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict

# -- names on OpenAI responses
FACTOR_SET_HEADER = "x-longrope-factor-set"  # NAME@VERSION the request finished on
UPGRADES_HEADER = "x-longrope-upgrades"  # a@1>b@1 when the request moved up
FACTOR_SET_FIELD = "longrope_factor_set"  # the same in JSON bodies and streamed chunks
UPGRADES_FIELD = "longrope_upgrades"

# -- per-request options, sent as OpenAI's ``vllm_xargs`` (= vLLM's SamplingParams.extra_args)
POLICY_XARG = "longrope_policy"  # upgrade | reserve | pin
FACTOR_SET_XARG = "longrope_factor_set"  # NAME: run on that live set, pinned (the response names it back)

# -- routing: which sets automatic admission may pick ("auto") and which only requests naming them get
Routing = Literal["auto", "explicit"]
ROUTINGS: tuple[str, ...] = get_args(Routing)
ROUTING_PARAM = "routing"  # query parameter of a load, body field of POST /admin/factors/{name}/routing

ADMIN_PREFIX = "/admin"


class LambdaSummary(BaseModel):
    count: int
    min: float
    max: float
    first: float
    last: float


class SetSummary(BaseModel):
    """One live set as the admin API reports it."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: int
    label: str
    max_len: int
    original_max_len: int
    scale: float
    rotary_dim: int
    rope_theta: float
    n_hat: int
    mscale: float
    factors: LambdaSummary
    monotone: bool
    provenance: dict[str, Any]
    rope_state_bytes: int  # what this version costs each worker, whatever its window
    versions: list[int]
    requests_served: int
    in_flight: int
    routing: Routing = "auto"  # explicit: only requests naming the set get it


class RopeStatus(BaseModel):
    """The workers' RoPE memory: per-step buffers plus one slot per held version (largest rank)."""

    state_bytes: int
    step_tokens: int
    versions_held: int
    workers: int


class SetListing(BaseModel):
    object: Literal["list"] = "list"
    data: list[SetSummary]
    max_model_len: int
    rope: RopeStatus


class LoadResult(BaseModel):
    object: Literal["list"] = "list"
    data: list[SetSummary]


class RoutingChange(BaseModel):
    """Body of ``POST /admin/factors/{name}/routing``."""

    model_config = ConfigDict(extra="forbid")

    routing: Routing


class RetireResult(BaseModel):
    retired: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error shape, for every admin error."""

    error: ErrorInfo
