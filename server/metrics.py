"""Prometheus metrics of longrope-serve, registered in prometheus-client's default registry so they are
served on vLLM's own ``/metrics`` next to the engine metrics (``vllm:*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Token-count buckets from 16 to 2M (powers of two): context lengths span 5 orders of magnitude.
TOKEN_BUCKETS = tuple(float(2**k) for k in range(4, 22))

PROMPT_TOKENS = Histogram(
    "longrope_prompt_tokens",
    "Prompt length of admitted requests, by factor set",
    ["factor_set", "version"],
    buckets=TOKEN_BUCKETS,
)
CONTEXT_TOKENS = Histogram(
    "longrope_context_tokens",
    "Total context (prompt + generated) of finished requests, by factor set",
    ["factor_set", "version"],
    buckets=TOKEN_BUCKETS,
)
REQUESTS = Counter(
    "longrope_requests",
    "Requests by factor set and outcome (finished, aborted, error)",
    ["factor_set", "version", "outcome"],
)
REJECTIONS = Counter("longrope_rejections", "Requests refused at admission, by reason", ["reason"])
LOADED_SETS = Gauge(
    "longrope_factor_set_loaded",
    "1 for each live factor set version (labels carry version and window)",
    ["factor_set", "version", "window"],
)
HOT_LOADS = Counter("longrope_hot_loads", "Admin set changes by action and result", ["action", "result"])
HOT_LOAD_SECONDS = Histogram(
    "longrope_hot_load_seconds",
    "Time from admin call to the new table being live",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


def publish_live_sets(sets: list) -> None:
    """Make the loaded-sets gauge show exactly the given sets."""
    LOADED_SETS.clear()
    for fs in sets:
        LOADED_SETS.labels(fs.name, str(fs.version), str(fs.max_len)).set(1)


# Upgrade by recompute (policy ``upgrade``): a request that outgrows its set moves to a larger one.
UPGRADE_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
UPGRADES = Counter(
    "longrope_upgrades",
    "Requests moved to a larger factor set because generation outgrew their set's window",
    ["from_set", "to_set"],
)
UPGRADE_RECOMPUTE_TOKENS = Counter(
    "longrope_upgrade_recompute_tokens",
    "Tokens (prompt + generated so far) whose KV cache was recomputed under the larger set by upgrades",
)
UPGRADE_RECOMPUTE_SECONDS = Histogram(
    "longrope_upgrade_recompute_seconds",
    "Time from an upgrade to the first token generated under the larger set (the recompute prefill)",
    buckets=UPGRADE_SECONDS_BUCKETS,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
REQUEST_LATENCY = Histogram(
    "longrope_request_latency_seconds",
    "Time from admission to the request's end, by the factor set it finished on",
    ["factor_set"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "longrope_time_to_first_token_seconds",
    "Time from admission to the first generated token, by the factor set the request started on",
    ["factor_set"],
    buckets=LATENCY_BUCKETS,
)

# Speculative decoding (ngram prompt lookup): vLLM's own vllm:spec_decode_* counters cover the engine; these split
# drafted and accepted tokens by the factor set the request (phase) ran on.
SPEC_DRAFTED = Counter(
    "longrope_spec_decode_drafted_tokens",
    "Draft tokens proposed by speculative decoding, by the factor set of the request phase that verified them",
    ["factor_set"],
)
SPEC_ACCEPTED = Counter(
    "longrope_spec_decode_accepted_tokens",
    "Draft tokens accepted by verification, by factor set",
    ["factor_set"],
)


def observe_spec_decode(factor_set: str, drafted: int, accepted: int) -> None:
    if drafted:
        SPEC_DRAFTED.labels(factor_set).inc(drafted)
        SPEC_ACCEPTED.labels(factor_set).inc(accepted)


def _zero_known_labels() -> None:
    """Create the label combinations known in advance at 0, so Prometheus's rate()/increase() see the first
    event of each (a series that appears with value 1 has no earlier sample to count from)."""
    for reason in ("too_long", "bad_request"):
        REJECTIONS.labels(reason)
    for action in ("load", "rollback", "retire", "routing", "sync"):
        for result in ("ok", "rejected"):
            HOT_LOADS.labels(action, result)


_zero_known_labels()
