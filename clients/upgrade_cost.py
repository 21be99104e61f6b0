"""What an upgrade costs: one request that outgrows its set (policy ``upgrade``) against the same request
admitted on the larger set from the start (policy ``reserve``), on a running longrope-serve.

    python -m clients.upgrade_cost --server http://127.0.0.1:8000 --window 8192 --json

The prompt is ``window - before`` random token ids, so the request crosses the window after ``before + 1``
generated tokens; the recompute time is read from the server's ``longrope_upgrade_recompute_seconds``
histogram (upgrade → first token under the larger set), the end-to-end times from the client.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.protocol import FACTOR_SET_HEADER, POLICY_XARG, UPGRADES_HEADER


def _complete(base: str, model: str, ids: list[int], new_tokens: int, policy: str, timeout: float) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "vllm_xargs": {POLICY_XARG: policy},
    }
    t0 = time.monotonic()
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=timeout)
    elapsed = time.monotonic() - t0
    if r.status_code != 200:
        raise SystemExit(f"error: HTTP {r.status_code} from {base}: {r.text[:500]}")
    return {
        "policy": policy,
        "seconds": round(elapsed, 3),
        "factor_set": r.headers.get(FACTOR_SET_HEADER),
        "upgrades": r.headers.get(UPGRADES_HEADER),
        "completion_tokens": r.json()["usage"]["completion_tokens"],
    }


def _recompute_seconds(base: str) -> tuple[float, float]:
    """(sum, count) of the server's recompute-time histogram."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return (
        samples.get("longrope_upgrade_recompute_seconds_sum", 0.0),
        samples.get("longrope_upgrade_recompute_seconds_count", 0.0),
    )


def measure(base: str, model: str, window: int, before: int, after: int, seed: int, timeout: float) -> dict[str, Any]:
    rng = random.Random(seed)
    prompt = [rng.randrange(100, 40000) for _ in range(window - before)]
    new_tokens = before + 1 + after
    s0, n0 = _recompute_seconds(base)
    upgraded = _complete(base, model, prompt, new_tokens, "upgrade", timeout)
    s1, n1 = _recompute_seconds(base)
    if n1 - n0 != 1 or not upgraded["upgrades"]:
        raise SystemExit(
            f"error: the request did not upgrade exactly once ({upgraded}); is --window the smallest set's?"
        )
    # a different prompt of the same length, so the reserve run cannot hit the upgrade's prefix cache
    prompt2 = [rng.randrange(100, 40000) for _ in range(window - before)]
    reserved = _complete(base, model, prompt2, new_tokens, "reserve", timeout)
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "recompute_tokens": window + 1,
        "recompute_seconds": round(s1 - s0, 3),
        "upgrade": upgraded,
        "reserve": reserved,
        "extra_seconds": round(upgraded["seconds"] - reserved["seconds"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.upgrade_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="http://127.0.0.1:8000", help="base URL of a running longrope-serve")
    p.add_argument("--model", default="smollm2-135m-instruct", help="served model name")
    p.add_argument("--window", type=int, default=8192, help="window of the set the request starts on")
    p.add_argument("--before", type=int, default=16, help="tokens generated on the small set before the crossing")
    p.add_argument("--after", type=int, default=16, help="tokens generated on the larger set after it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        result = measure(args.server, args.model, args.window, args.before, args.after, args.seed, args.timeout)
    except httpx.HTTPError as err:
        print(f"error: no answer from {args.server}: {err}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"recompute of {result['recompute_tokens']} tokens: {result['recompute_seconds']} s; request "
            f"{result['upgrade']['seconds']} s with the upgrade vs {result['reserve']['seconds']} s on "
            f"{result['reserve']['factor_set']} from the start"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
