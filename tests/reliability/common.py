"""Helpers shared by the reliability tests (HTTP only; the server is a real process)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from api.conftest import ADMIN_TOKEN
from engine_harness import ids_of


def run_slow(config: pytest.Config) -> bool:
    """The longer variants were asked for: ``--run-slow`` (where a conftest registered it) or LONGROPE_RUN_SLOW=1."""
    option = False
    try:
        option = bool(config.getoption("--run-slow"))
    except ValueError:
        pass
    return option or os.environ.get("LONGROPE_RUN_SLOW", "") not in ("", "0")


STATIC = {"original@1", "mid@1", "nhat@1"}  # the start-up sets; the load tests' admin calls never touch them


@dataclass
class Outcome:
    """One request of a load test: when it was sent and answered, its status and the set labels it names."""

    sent: float
    done: float
    status: int
    labels: list[str]
    kind: str = ""
    index: int = -1
    upgrades: str | None = None
    tokens: int = 0
    error: str = ""


@dataclass
class AdminEvent:
    """One admin call of a load test; ``live_after``: the churned set's live label once it returned (None: retired)."""

    action: str
    started: float
    finished: float
    live_after: str | None


def live_windows(events: list[AdminEvent]) -> dict[str, list[tuple[float, float]]]:
    """Per label of the churned set, the intervals in which it may have been live: from the start of the call
    that made it live to the end of the call that replaced or retired it."""
    windows: dict[str, list[tuple[float, float]]] = {}
    current: str | None = None
    for ev in events:
        if current is not None:
            lo, _ = windows[current][-1]
            windows[current][-1] = (lo, ev.finished)
        if ev.live_after is not None:
            windows.setdefault(ev.live_after, []).append((ev.started, float("inf")))
        current = ev.live_after
    return windows


def was_live(label: str, o: Outcome, windows: dict[str, list[tuple[float, float]]]) -> bool:
    """A start-up set, or a churned label live at some moment while the request was in flight."""
    return label in STATIC or any(lo <= o.done and o.sent <= hi for lo, hi in windows.get(label, []))


AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PAIRS = 32  # the tiny model: head_dim 64 → 32 frequency pairs

# Greedy probes, one per start-up set's window: (prompt length, max_tokens) → original, mid, nhat.
PROBES = [(40, 12), (300, 12), (1100, 12)]


def set_body(name: str, scale: float = 1.5, **over: Any) -> dict[str, Any]:
    """A valid factor set for the tiny model (window 512 unless overridden)."""
    body: dict[str, Any] = {
        "name": name,
        "factors": [1.0 + scale * i / (PAIRS - 1) for i in range(PAIRS)],
        "rope_theta": 10000.0,
        "rotary_dim": 2 * PAIRS,
        "original_max_len": 256,
        "max_len": 512,
    }
    body.update(over)
    return body


def complete(client: httpx.Client, base: str, length: int, max_tokens: int, seed: int | None = None) -> dict:
    """One greedy completion of a deterministic prompt; the body plus the set that served it."""
    r = client.post(
        f"{base}/v1/completions",
        json={
            "model": "tiny",
            "prompt": ids_of(length, length if seed is None else seed),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "return_token_ids": True,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"set": r.headers["x-longrope-factor-set"], "text": choice["text"], "ids": choice.get("token_ids")}


def probe_outputs(base: str) -> list[dict]:
    with httpx.Client() as client:
        return [complete(client, base, n, m) for n, m in PROBES]


def live_labels(base: str) -> list[str]:
    r = httpx.get(f"{base}/admin/factors", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return sorted(s["label"] for s in r.json()["data"])


def listing(base: str) -> dict:
    """The admin listing without its traffic counters (those move with every probe)."""
    r = httpx.get(f"{base}/admin/factors", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    data = r.json()
    for s in data["data"]:
        s.pop("requests_served", None)
        s.pop("in_flight", None)
    return data


def registry_bytes(root: Path) -> dict[str, bytes]:
    """Every file under the registry, byte for byte (temp files included)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_openai_error(r: httpx.Response, status: int, fragment: str) -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    assert fragment in err["message"], f"{fragment!r} not in {err['message']!r}"
    return err
