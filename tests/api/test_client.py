"""clients/: the admin client (sync and async), the OpenAI helper, stats and the CLI against a running server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from api.conftest import ADMIN_TOKEN, RunningServer
from engine_harness import ids_of

from clients.client import (
    AdminClient,
    AsyncAdminClient,
    LongRopeError,
    ServerUnavailable,
    factor_set_of,
    openai_client,
    stats,
)

pytestmark = pytest.mark.engine

CLI = str(Path(sys.executable).parent / "longrope-client")


def small_set(name: str = "client-set", **over: object) -> dict:
    body = {
        "name": name,
        "factors": [1.0 + i / 31 for i in range(32)],
        "rope_theta": 10000.0,
        "rotary_dim": 64,
        "original_max_len": 256,
        "max_len": 600,
    }
    body.update(over)
    return body


def run_cli(server: RunningServer, *args: str, token: str | None = ADMIN_TOKEN) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "LONGROPE_URL": server.base}
    if token is not None:
        env["LONGROPE_ADMIN_TOKEN"] = token
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=120)


def test_admin_client_round_trip(running: RunningServer, tmp_path: Path) -> None:
    with AdminClient(running.base, ADMIN_TOKEN) as admin:
        before = {s.label for s in admin.list()}
        (loaded,) = admin.load(small_set())
        assert loaded.label == "client-set@1" and loaded.max_len == 600 and loaded.factors.count == 32
        (v2,) = admin.load(small_set(factors=[1.0 + 2 * i / 31 for i in range(32)]))
        assert v2.label == "client-set@2"
        oai = openai_client(running.base, max_retries=0)
        raw = oai.completions.with_raw_response.create(model="tiny", prompt=ids_of(500, 1), max_tokens=4)
        assert factor_set_of(raw) == "client-set@2" and factor_set_of(raw.parse()) == "client-set@2"
        assert admin.rollback("client-set").label == "client-set@1"
        csv = tmp_path / "f.csv"
        csv.write_text(",".join(str(1.0 + i / 40) for i in range(32)))
        assert admin.load_csv(csv, "csv-client", 700).label == "csv-client@1"
        with pytest.raises(LongRopeError) as err:
            admin.load(small_set(factors=[1.0] * 3))
        assert err.value.status == 400 and "expected 32 values" in err.value.message
        assert admin.retire("client-set") == "client-set@1"
        assert admin.retire("csv-client") == "csv-client@1"
        assert {s.label for s in admin.list()} == before
    with AdminClient(running.base, "wrong") as bad, pytest.raises(LongRopeError) as err:
        bad.list()
    assert err.value.status == 401 and "LONGROPE_ADMIN_TOKEN" in err.value.message


def test_async_admin_client(running: RunningServer) -> None:
    async def go() -> list[str]:
        async with AsyncAdminClient(running.base, ADMIN_TOKEN) as admin:
            (loaded,) = await admin.load(small_set("async-set"))
            labels = [s.label for s in await admin.list()]
            assert await admin.retire("async-set") == loaded.label
            return labels

    assert "async-set@1" in asyncio.run(go())


def test_stats_from_metrics(running: RunningServer) -> None:
    oai = openai_client(running.base, max_retries=0)
    for n in (40, 60):
        oai.completions.create(model="tiny", prompt=ids_of(n, n), max_tokens=3)
    data = stats(running.base)
    original = data["original@1"]
    assert original["requests"]["finished"] >= 2
    assert original["prompt_tokens"]["count"] >= 2 and 16 <= original["prompt_tokens"]["p50"] <= 256


def test_server_down_is_a_clear_error() -> None:
    with (
        AdminClient("http://127.0.0.1:9", ADMIN_TOKEN) as admin,
        pytest.raises(ServerUnavailable, match="is it running"),
    ):
        admin.list()


def test_cli(running: RunningServer, tmp_path: Path) -> None:
    out = run_cli(running, "complete", "Once upon a time", "--max-tokens", "5")
    assert out.returncode == 0, out.stderr
    assert "[factor set: original@1]" in out.stderr
    out = run_cli(running, "chat", "hello", "--max-tokens", "4")
    assert out.returncode == 0 and "[factor set: original@1]" in out.stderr
    path = tmp_path / "cli-set.json"
    path.write_text(json.dumps(small_set("cli-set")))
    out = run_cli(running, "factors", "load", str(path))
    assert out.returncode == 0 and "loaded cli-set@1 (window 600)" in out.stdout
    out = run_cli(running, "factors", "list")
    assert out.returncode == 0 and "cli-set@1" in out.stdout and "mid@1" in out.stdout
    listed = json.loads(run_cli(running, "factors", "list", "--json").stdout)
    assert any(s["label"] == "cli-set@1" for s in listed)
    out = run_cli(running, "factors", "rollback", "cli-set")
    assert out.returncode == 2 and "no earlier version" in out.stderr
    out = run_cli(running, "factors", "retire", "cli-set")
    assert out.returncode == 0 and "retired cli-set@1" in out.stdout
    out = run_cli(running, "stats")
    assert out.returncode == 0 and "original@1" in out.stdout
    out = run_cli(running, "factors", "list", token="wrong")
    assert out.returncode == 2 and "missing or wrong admin token" in out.stderr and "HTTP 401" in out.stderr
    out = run_cli(running, "complete", "x", "--max-tokens", "2048")  # ≤ the engine window, but prompt + 2048 > 2048
    assert out.returncode == 2 and "ask for max_tokens ≤" in out.stderr and "HTTP 400" in out.stderr
    down = subprocess.run(
        [CLI, "--url", "http://127.0.0.1:9", "factors", "list"], capture_output=True, text=True, timeout=60
    )
    assert down.returncode == 3 and "no longrope-serve answered" in down.stderr
