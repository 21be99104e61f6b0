"""Faults on real servers: kill -9 during hot-loads, then a restart on the same registry (with one set's
file damaged meanwhile); the admin API on its own port; the engine process dying under load."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from api.conftest import ADMIN_TOKEN, RunningServer, start_server
from engine_harness import ids_of
from reliability.common import AUTH, live_labels, set_body

from clients.launch import free_port

pytestmark = pytest.mark.engine


def kill9(srv: RunningServer) -> None:
    """SIGKILL the server and (so nothing lingers) its engine processes."""
    children = psutil.Process(srv.proc.pid).children(recursive=True)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(30)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)


def test_kill9_during_loads_then_restart_with_a_corrupt_set(tiny_llama: Path, set_files: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start_server(tiny_llama, set_files, tmp_path / "a")
    registry = first.registry
    acked: list[int] = []
    stop = threading.Event()

    def churn() -> None:
        """Hot-load new versions of 'churn' back to back until the kill."""
        with httpx.Client(base_url=first.base, headers=AUTH, timeout=30) as client:
            while not stop.is_set():
                try:
                    r = client.post("/admin/factors", json=set_body("churn", 1.0 + len(acked) % 5))
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    acked.append(r.json()["data"][0]["version"])

    thread = threading.Thread(target=churn)
    try:
        thread.start()
        deadline = time.monotonic() + 120
        while len(acked) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(acked) >= 6, f"only {len(acked)} loads acknowledged"
        kill9(first)  # mid-stream: the next load is being written or pushed
    finally:
        stop.set()
        thread.join(30)
        if first.proc.poll() is None:
            first.proc.kill()
    pointer = json.loads((registry / "live.json").read_text())  # whole, whatever moment the kill hit
    assert acked[-1] <= pointer["live"]["churn"] <= acked[-1] + 1, (acked, pointer)
    damaged = registry / "sets" / "mid" / "1.json"
    damaged.write_text(damaged.read_text()[:100])  # a truncated file, as a disk error would leave it
    second = start_server(tiny_llama, set_files, tmp_path / "b", registry=registry)
    try:
        log = second.log.read_text()
        errors = [line for line in log.splitlines() if "ERROR" in line and "REGISTRY" in line]
        assert any(str(damaged) in line and "skipping mid@1" in line for line in errors), errors or log[-3000:]
        expected = {f"{n}@{v}" for n, v in pointer["live"].items() if n != "mid"}
        assert set(live_labels(second.base)) == expected
        assert not list(registry.rglob("*.tmp"))
        for length, label in ((40, "original@1"), (300, f"churn@{pointer['live']['churn']}"), (1100, "nhat@1")):
            r = httpx.post(
                f"{second.base}/v1/completions",
                json={"model": "tiny", "prompt": ids_of(length, length), "max_tokens": 8},
                timeout=120,
            )
            assert r.status_code == 200 and r.headers["x-longrope-factor-set"] == label, (length, r.text[:300])
        print(f"\nkill -9 after {len(acked)} acknowledged loads; restart: {sorted(expected)}")
    finally:
        second.stop()


@pytest.fixture(scope="module")
def admin_port_server(
    tiny_llama: Path, set_files: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    port = free_port()
    srv = start_server(
        tiny_llama, set_files, tmp_path_factory.mktemp("admin-port"), extra_args=["--admin-port", str(port)]
    )
    srv.admin_base = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()


def test_admin_on_its_own_port_only(admin_port_server: RunningServer) -> None:
    srv = admin_port_server
    admin_base = srv.admin_base  # type: ignore[attr-defined]
    r = httpx.get(f"{admin_base}/admin/factors", headers=AUTH, timeout=30)
    assert r.status_code == 200 and {"original@1", "mid@1", "nhat@1"} <= {s["label"] for s in r.json()["data"]}
    assert httpx.get(f"{admin_base}/admin/factors", timeout=30).status_code == 401
    r = httpx.get(f"{srv.base}/admin/factors", headers=AUTH, timeout=30)
    assert r.status_code == 404, r.text
    assert httpx.post(f"{srv.base}/admin/factors", json=set_body("x"), headers=AUTH, timeout=30).status_code == 404
    port = int(admin_base.rsplit(":", 1)[1])
    listening = [
        c.laddr
        for c in psutil.Process(srv.proc.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening  # loopback by default
    assert ADMIN_TOKEN not in srv.log.read_text(errors="replace")


def test_engine_death_under_load_gives_503_not_hangs(admin_port_server: RunningServer) -> None:
    """Requests in flight when the engine dies end (error or cut stream) instead of hanging; requests
    after it get 503 (or no connection, once vLLM's watchdog has stopped the server)."""
    srv = admin_port_server

    def long_request(i: int) -> tuple[float, str]:
        t0 = time.monotonic()
        body = {"model": "tiny", "prompt": ids_of(50, 500 + i), "max_tokens": 1500, "ignore_eos": True}
        try:
            if i % 2:
                with httpx.stream("POST", f"{srv.base}/v1/completions", json={**body, "stream": True}, timeout=90) as r:
                    text = "".join(r.iter_text())
                    events = [line[6:] for line in text.splitlines() if line.startswith("data: {")]
                    errored = any("error" in json.loads(e) for e in events)
                    outcome = f"{r.status_code} {'error event' if errored else 'no error event'}"
            else:
                r = httpx.post(f"{srv.base}/v1/completions", json=body, timeout=90)
                outcome = str(r.status_code)
        except httpx.TimeoutException:
            outcome = "hang"
        except httpx.HTTPError as err:
            outcome = type(err).__name__
        return time.monotonic() - t0, outcome

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(long_request, i) for i in range(6)]
        time.sleep(2.0)  # all six are generating
        cores = [
            p for p in psutil.Process(srv.proc.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline())
        ]
        assert cores, "no engine core process found"
        killed_at = time.monotonic()
        for p in cores:
            p.kill()
        after: list[str] = []
        while time.monotonic() - killed_at < 20 and srv.proc.poll() is None:
            try:
                r = httpx.post(
                    f"{srv.base}/v1/completions",
                    json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2},
                    timeout=10,
                )
                after.append(str(r.status_code))
            except httpx.TimeoutException:
                after.append("hang")
            except httpx.HTTPError:
                after.append("down")
            time.sleep(0.2)
        in_flight = [f.result() for f in futures]
    print(f"\nin flight at the kill: {in_flight}; after: {sorted(set(after))} ({len(after)} requests)")
    assert all(seconds < 60 and outcome != "hang" for seconds, outcome in in_flight), in_flight
    # none of them looks like a success: a 5xx, an error event in the stream, or a cut connection
    assert not any(o in ("200", "200 no error event") for _, o in in_flight), in_flight
    assert "hang" not in after and all(a in ("503", "500", "down") for a in after), after
    assert srv.proc.wait(60) is not None  # vLLM's watchdog stops the server: a supervisor restarts it
    plain = [o for i, (_, o) in enumerate(in_flight) if i % 2 == 0]
    assert all(o == "503" for o in plain + after if o != "down"), f"not 503 after the engine died: {plain + after}"
