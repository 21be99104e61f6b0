"""Bounded soak on loopback: mixed-length requests at concurrency 8 while three hot-loads and one
rollback happen in the middle. Nothing fails, every response names set@versions that were live while it
was in flight, and greedy outputs of probes on sets no load touched are identical before and after.

CI runs 300 requests; --run-slow (or LONGROPE_RUN_SLOW=1) runs 3,000."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
from api.conftest import RunningServer
from engine_harness import ids_of
from reliability.common import AUTH, AdminEvent, Outcome, live_windows, probe_outputs, run_slow, set_body, was_live

pytestmark = pytest.mark.engine

CONCURRENCY = 8


async def one_request(client: httpx.AsyncClient, index: int, rng: random.Random) -> Outcome:
    length = rng.choice([rng.randint(8, 200), rng.randint(260, 480), rng.randint(520, 1000), rng.randint(1030, 1500)])
    max_tokens = rng.randint(4, 24)
    stream = rng.random() < 0.25
    body = {"model": "tiny", "prompt": ids_of(length, 10_000 + index), "max_tokens": max_tokens, "temperature": 0.0}
    sent = time.monotonic()
    try:
        if stream:
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                text = "".join([chunk async for chunk in r.aiter_text()])
                ok = r.status_code == 200 and "data: [DONE]" in text
                header = r.headers.get("x-longrope-factor-set", "")
                status = r.status_code if ok else 599
        else:
            r = await client.post("/v1/completions", json=body)
            header = r.headers.get("x-longrope-factor-set", "")
            status = r.status_code
            if status == 200:
                usage = r.json()["usage"]
                assert usage["prompt_tokens"] == length and 1 <= usage["completion_tokens"] <= max_tokens
    except (httpx.HTTPError, AssertionError) as err:
        return Outcome(sent, time.monotonic(), 0, [], index=index, error=repr(err))
    return Outcome(sent, time.monotonic(), status, [x for x in header.split(",") if x], index=index)


async def admin(client: httpx.AsyncClient, action: str, events: list[AdminEvent]) -> None:
    started = time.monotonic()
    if action.startswith("load"):
        r = await client.post("/admin/factors", json=set_body("soak", 1.0 + len(events)), headers=AUTH)
        assert r.status_code == 201, r.text
        label = r.json()["data"][0]["label"]
    else:
        r = await client.post("/admin/factors/soak/rollback", headers=AUTH)
        assert r.status_code == 200, r.text
        label = r.json()["label"]
    events.append(AdminEvent(action, started, time.monotonic(), label))


async def soak(base: str, total: int) -> tuple[list[Outcome], list[AdminEvent], float]:
    rng = random.Random(20261125)
    events: list[AdminEvent] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    outcomes: list[Outcome] = []
    done_count = 0
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:

        async def worker() -> None:
            nonlocal done_count
            while not queue.empty():
                index = queue.get_nowait()
                outcomes.append(await one_request(client, index, rng))
                done_count += 1

        async def admin_schedule() -> None:
            # load at 20 %, load at 40 %, roll back at 55 %, load at 70 % of the requests finished
            for frac, action in ((0.2, "load"), (0.4, "load"), (0.55, "rollback"), (0.7, "load")):
                while done_count < frac * total:
                    await asyncio.sleep(0.05)
                await admin(client, action, events)

        await asyncio.gather(admin_schedule(), *[worker() for _ in range(CONCURRENCY)])
    return sorted(outcomes, key=lambda o: o.index), events, time.monotonic() - t0


def test_soak_with_hot_loads_and_rollback(rel_server: RunningServer, request: pytest.FixtureRequest) -> None:
    total = 3000 if run_slow(request.config) else 300
    before = probe_outputs(rel_server.base)
    outcomes, events, seconds = asyncio.run(soak(rel_server.base, total))
    after = probe_outputs(rel_server.base)
    try:
        failed = [o for o in outcomes if o.status != 200]
        assert len(outcomes) == total and not failed, failed[:5]
        assert [e.action for e in events] == ["load", "load", "rollback", "load"]
        windows = live_windows(events)
        soak_labels = [e.live_after for e in events]
        assert soak_labels[2] == soak_labels[0]  # the rollback went back to the first loaded version
        wrong = []
        for o in outcomes:
            assert o.labels, o
            for label in o.labels:
                if not was_live(label, o, windows):
                    wrong.append((o.index, label, o.sent, o.done, windows))
        assert not wrong, wrong[:3]
        used = {label for o in outcomes for label in o.labels}
        assert {soak_labels[0], soak_labels[1], soak_labels[3]} <= used  # each loaded version served traffic
        # probes on original@1 (40 tokens), mid@1 (300), nhat@1 (1100): the soak set (window 512) takes
        # 300 + 12 from mid after the first load, so only the untouched sets' outputs must be identical
        assert [before[0], before[2]] == [after[0], after[2]]
        assert before[1]["set"] == "mid@1" and after[1]["set"] == soak_labels[3]
    finally:
        print(
            f"\nsoak: {total} requests at concurrency {CONCURRENCY} in {seconds:.1f} s,"
            f" {sum(o.status == 200 for o in outcomes)} ok; admin: "
            + ", ".join(f"{e.action}→{e.live_after} {1e3 * (e.finished - e.started):.0f} ms" for e in events)
        )
        r = httpx.delete(f"{rel_server.base}/admin/factors/soak", headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
