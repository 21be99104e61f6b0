"""64 concurrent clients on loopback for a fixed time, with short, long, streamed and upgrading requests, while a
set is hot-loaded, rolled back or retired every few seconds. Nothing fails, every response's set@version was
live while it was in flight, untouched probes are byte-identical before and after; latency percentiles and
throughput are printed.

CI runs 20 s of traffic; --run-slow (or LONGROPE_RUN_SLOW=1) runs 60 s."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import httpx
import pytest
from api.conftest import RunningServer
from engine_harness import ids_of
from reliability.common import AUTH, AdminEvent, Outcome, live_windows, probe_outputs, run_slow, set_body, was_live

pytestmark = pytest.mark.engine

CLIENTS = 64
ADMIN_EVERY_S = 3.0
CHURN = "churn"  # window 512: prompts of 260–480 tokens land on it while it is live, on mid otherwise


KINDS = ("short", "churn", "long", "stream", "upgrade")


async def one_request(client: httpx.AsyncClient, index: int, rng: random.Random) -> Outcome:
    kind = KINDS[index % len(KINDS)]
    length, max_tokens = {
        "short": (rng.randint(8, 200), rng.randint(4, 16)),
        "churn": (rng.randint(260, 480), rng.randint(4, 16)),
        "long": (rng.randint(1030, 1500), rng.randint(4, 12)),
        "stream": (rng.randint(8, 900), rng.randint(4, 16)),
        "upgrade": (rng.randint(236, 250), 24),  # crosses the 256-token window: original → mid
    }[kind]
    body = {"model": "tiny", "prompt": ids_of(length, 50_000 + index), "max_tokens": max_tokens, "temperature": 0.0}
    if kind == "upgrade":
        body["ignore_eos"] = True
    sent = time.monotonic()
    try:
        if kind == "stream":
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                text = "".join([chunk async for chunk in r.aiter_text()])
                status = r.status_code if r.status_code == 200 and "data: [DONE]" in text else 599
                headers = r.headers
            tokens = 0
        else:
            r = await client.post("/v1/completions", json=body)
            status, headers = r.status_code, r.headers
            tokens = r.json()["usage"]["completion_tokens"] if status == 200 else 0
    except httpx.HTTPError as err:
        return Outcome(sent, time.monotonic(), 0, [], kind=kind, error=repr(err))
    labels = [x for x in headers.get("x-longrope-factor-set", "").split(",") if x]
    return Outcome(
        sent, time.monotonic(), status, labels, kind=kind, upgrades=headers.get("x-longrope-upgrades"), tokens=tokens
    )


async def admin(client: httpx.AsyncClient, action: str, events: list[AdminEvent], k: int) -> None:
    started = time.monotonic()
    if action == "load":
        r = await client.post("/admin/factors", json=set_body(CHURN, 1.0 + 0.25 * k), headers=AUTH)
        assert r.status_code == 201, r.text
        label = r.json()["data"][0]["label"]
    elif action == "rollback":
        r = await client.post(f"/admin/factors/{CHURN}/rollback", headers=AUTH)
        assert r.status_code == 200, r.text
        label = r.json()["label"]
    else:
        r = await client.delete(f"/admin/factors/{CHURN}", headers=AUTH)
        assert r.status_code == 200, r.text
        label = None
    events.append(AdminEvent(action, started, time.monotonic(), label))


async def churn(base: str, seconds: float) -> tuple[list[Outcome], list[AdminEvent], float]:
    rng = random.Random(20261202)
    events: list[AdminEvent] = []
    outcomes: list[Outcome] = []
    counter = iter(range(10**9))
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=CLIENTS + 4)
    plan = ["load", "load", "rollback", "retire"]
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        def running() -> bool:
            # the whole plan runs at least once, under traffic, however slowly a loaded machine gets there
            return time.monotonic() - t0 < seconds or len(events) < len(plan)

        async def worker() -> None:
            while running():
                outcomes.append(await one_request(client, next(counter), rng))

        async def admin_schedule() -> None:
            k = 0
            while running():
                await asyncio.sleep(ADMIN_EVERY_S)
                await admin(client, plan[k % len(plan)], events, k)
                k += 1

        await asyncio.gather(admin_schedule(), *[worker() for _ in range(CLIENTS)])
    return outcomes, events, time.monotonic() - t0


def test_64_clients_with_hot_load_churn(rel_server: RunningServer, request: pytest.FixtureRequest) -> None:
    seconds = 60.0 if run_slow(request.config) else 20.0
    before = probe_outputs(rel_server.base)
    outcomes, events, wall = asyncio.run(churn(rel_server.base, seconds))
    after = probe_outputs(rel_server.base)
    try:
        failed = [o for o in outcomes if o.status != 200]
        assert outcomes and not failed, failed[:5]
        assert len(events) >= 4 and {e.action for e in events} >= {"load", "rollback", "retire"}
        windows = live_windows(events)
        wrong = []
        for o in outcomes:
            assert len(o.labels) == 1, o
            (label,) = o.labels
            if not was_live(label, o, windows):
                wrong.append((o.kind, label, o.sent, o.done))
        assert not wrong, (wrong[:3], windows)
        for o in outcomes:
            if o.kind == "upgrade":  # moved to the smallest larger set live at the crossing: churn or mid
                assert o.upgrades == f"original@1>{o.labels[0]}" and o.tokens == 24, o
                assert o.labels[0] == "mid@1" or o.labels[0].startswith(f"{CHURN}@"), o
            elif o.kind == "long":
                assert o.labels == ["nhat@1"] and o.upgrades is None, o
        assert any(o.labels[0].startswith(f"{CHURN}@") for o in outcomes), "no request ran on the churned set"
        # probes on original@1 (40 tokens) and nhat@1 (1100) are untouched by the churn: byte-identical
        assert [before[0], before[2]] == [after[0], after[2]]
    finally:
        lat = sorted(o.done - o.sent for o in outcomes if o.status == 200)
        if lat:
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            print(
                f"\n{CLIENTS} clients for {seconds:.0f} s (wall {wall:.1f} s): {len(outcomes)} requests,"
                f" {sum(o.status == 200 for o in outcomes)} ok, {len(outcomes) / wall:.2f} requests/s;"
                f" latency p50 {statistics.median(lat):.2f} s, p99 {p99:.2f} s; admin: "
                + ", ".join(f"{e.action}→{e.live_after} {1e3 * (e.finished - e.started):.0f} ms" for e in events)
            )
        if any(e.live_after is not None for e in events[-1:]):
            r = httpx.delete(f"{rel_server.base}/admin/factors/{CHURN}", headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
