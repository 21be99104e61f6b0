"""Admin API security on a real server: 401 for every missing or wrong token, with no timing difference
worth measuring between wrong tokens of different lengths; the token never reaches the log."""

from __future__ import annotations

import random
import statistics
import time

import httpx
import pytest
from api.conftest import ADMIN_TOKEN, RunningServer
from reliability.common import AUTH, assert_openai_error

pytestmark = pytest.mark.engine

WRONG = {
    "missing": {},
    "empty": {"Authorization": "Bearer"},
    "other-scheme": {"Authorization": f"Basic {ADMIN_TOKEN}"},
    "no-scheme": {"Authorization": ADMIN_TOKEN},
    "one-char-off": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}x"},
    "prefix": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
    "longer": {"Authorization": f"Bearer {ADMIN_TOKEN}0"},
    "short": {"Authorization": "Bearer x"},
    "long": {"Authorization": "Bearer " + "y" * 4096},
    "lower-case-token": {"Authorization": f"Bearer {ADMIN_TOKEN.upper()}"},
}


@pytest.mark.parametrize("name", list(WRONG))
def test_wrong_or_missing_token_is_401(rel_server: RunningServer, name: str) -> None:
    for method, path in (("GET", "/admin/factors"), ("POST", "/admin/factors"), ("DELETE", "/admin/factors/mid")):
        r = httpx.request(method, f"{rel_server.base}{path}", headers=WRONG[name], json={}, timeout=30)
        assert_openai_error(r, 401, "missing or wrong admin token")
        assert r.headers["www-authenticate"] == "Bearer"
        assert ADMIN_TOKEN not in r.text


def test_no_timing_difference_between_wrong_tokens(rel_server: RunningServer) -> None:
    """Wrong tokens of the right length (one character off), shorter, longer and missing, interleaved at
    random, 100 requests each over one keep-alive connection: their median latencies agree within noise.
    (A byte-by-byte comparison would leak far less than this test can see; it guards against a future
    early return such as a length check before hmac.compare_digest turning into a different code path.)"""
    kinds = ["one-char-off", "prefix", "short", "long", "missing"]
    order = [k for k in kinds for _ in range(100)]
    random.Random(8).shuffle(order)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with httpx.Client(base_url=rel_server.base, timeout=30) as client:
        for _ in range(20):  # warm-up
            client.get("/admin/factors", headers=WRONG["short"])
        for kind in order:
            t0 = time.perf_counter()
            r = client.get("/admin/factors", headers=WRONG[kind])
            times[kind].append(time.perf_counter() - t0)
            assert r.status_code == 401
    medians = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0] for k, v in times.items()}
    print(f"\n401 latency medians (ms): { {k: round(v * 1e3, 3) for k, v in medians.items()} }")
    print(f"401 latency IQR (ms): { {k: round(v * 1e3, 3) for k, v in spread.items()} }")
    reference = medians["one-char-off"]
    noise = max(statistics.median(spread.values()), 0.1 * reference)
    for kind, median in medians.items():
        assert abs(median - reference) <= max(noise, 0.5e-3), (kind, medians, spread)


def test_token_never_logged(rel_server: RunningServer) -> None:
    """After authorised and refused admin calls (this module and the others sharing the server), the
    token appears nowhere in the server's log."""
    assert httpx.get(f"{rel_server.base}/admin/factors", headers=AUTH, timeout=30).status_code == 200
    assert httpx.post(f"{rel_server.base}/admin/factors", headers=AUTH, content=b"{", timeout=30).status_code == 400
    text = rel_server.log.read_text(errors="replace")
    assert "/admin/factors" in text  # the access log is there ...
    assert ADMIN_TOKEN not in text  # ... the token is not
