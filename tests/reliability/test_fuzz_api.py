"""Schemathesis against the real server's own OpenAPI schema (tiny model): no 5xx and no response that
breaks the published schema, across the OpenAI routes our code wraps, vLLM's routes around them and the
admin API (with the token, so requests get past authentication). Bounded: derandomized Hypothesis, a few
positive and negative examples per operation, generation capped at a few tokens.

Every operation the schema publishes is either fuzzed (OPERATIONS) or left out with its reason
(EXCLUDED, also in docs/reliability.md); a new operation fails test_every_operation_is_accounted_for.
(Schemathesis' own lazy pytest loader needs a pytest-internal attribute that pytest 9 removed, so the
operations are parametrised here and each runs its own Hypothesis test.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from api.conftest import RunningServer
from hypothesis import HealthCheck, given, settings
from reliability.common import AUTH, run_slow
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.generation.modes import GenerationMode

pytestmark = pytest.mark.engine

OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/ping"),
    ("POST", "/ping"),
    ("GET", "/load"),
    ("GET", "/version"),
    ("GET", "/metrics"),
    ("GET", "/kv_event_sources"),
    ("GET", "/v1/models"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions/batch"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{response_id}"),
    ("POST", "/v1/responses/{response_id}/cancel"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/generative_scoring"),
    ("POST", "/invocations"),
    ("GET", "/admin/factors"),
    ("POST", "/admin/factors"),
    ("GET", "/admin/factors/{name}"),
    ("POST", "/admin/factors/{name}/rollback"),
    ("POST", "/admin/factors/{name}/routing"),
    ("DELETE", "/admin/factors/{name}"),
]
EXCLUDED = {
    ("POST", "/scale_elastic_ep"): "vLLM elastic expert parallelism: re-shards a MoE engine across data-parallel "
    "ranks; this server runs one dense model on one worker, and a call would try to reconfigure the engine",
    ("POST", "/is_scaling_elastic_ep"): "status of /scale_elastic_ep (elastic expert parallelism), not used here",
    ("POST", "/v1/systemone"): "vLLM's structured-decision API for the models that implement it; for any other "
    "model (the tiny Llama, SmolLM2) vLLM answers 501 Not Implemented by design, which the 5xx check flags",
}
# Operations with inputs that can be made invalid (a body, or typed parameters); for the others Hypothesis
# cannot generate a negative case at all.
NEGATIVE = {
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions/batch"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{response_id}"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/generative_scoring"),
    ("POST", "/admin/factors"),
    ("POST", "/admin/factors/{name}/routing"),
}
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if (m, p) in NEGATIVE
]
GENERATION_CAP = 4  # tokens; the tiny engine would otherwise generate up to its 2048-token window per case
CAPPED_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens")
MAX_EXAMPLES = 5  # per operation and mode (positive, negative); 30 with --run-slow
STATUSES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def api_schema(rel_server: RunningServer) -> Any:
    return schemathesis.openapi.from_url(f"{rel_server.base}/openapi.json", timeout=60)


@pytest.fixture(scope="module", autouse=True)
def report_statuses() -> Iterator[None]:
    """Print how many requests got which status class (the numbers in docs/reliability.md; see with -s)."""
    yield
    print(f"\nschemathesis: {sum(STATUSES.values())} requests, by status: {dict(sorted(STATUSES.items()))}")


def bound_generation(body: Any) -> None:
    """Keep every generating request short: cap integer token budgets, ask for a few tokens where none
    is given, at most 2 choices. Invalid values (strings, negatives) are left for the server to refuse —
    that is part of what is tested."""
    if not isinstance(body, dict):
        return
    for key in CAPPED_FIELDS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > GENERATION_CAP:
            body[key] = GENERATION_CAP
    if not any(key in body for key in CAPPED_FIELDS[:3]):
        body["max_tokens"] = GENERATION_CAP
    for key in ("n", "best_of"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 2:
            body[key] = 2


def test_every_operation_is_accounted_for(api_schema: Any) -> None:
    published = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert published == set(OPERATIONS) | set(EXCLUDED)


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_no_server_errors_and_schema_conformance(
    api_schema: Any, rel_server: RunningServer, method: str, path: str, mode: GenerationMode, request: Any
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=30 if run_slow(request.config) else MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: Any) -> None:
        bound_generation(case.body)
        response = case.call_and_validate(
            base_url=rel_server.base,
            headers=AUTH,
            checks=[not_a_server_error, response_schema_conformance],
            timeout=120,
        )
        STATUSES[f"{response.status_code // 100}xx"] += 1

    run()
    assert rel_server.proc.poll() is None, "the server died"
