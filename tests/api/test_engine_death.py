"""When the engine process dies, /health says 503 and the server stops instead of hanging."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest
from api.conftest import start_server

pytestmark = pytest.mark.engine


def test_engine_death_gives_503_and_exit(tiny_llama: Path, set_files: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_llama, set_files, tmp_path, admin=False)
    try:
        assert httpx.get(f"{srv.base}/health", timeout=5).status_code == 200
        cores = [
            p for p in psutil.Process(srv.proc.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline())
        ]
        assert cores, "no engine core process found"
        for p in cores:
            p.kill()
        statuses = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and srv.proc.poll() is None:
            try:
                statuses.add(httpx.get(f"{srv.base}/health", timeout=5).status_code)
            except httpx.HTTPError:
                statuses.add("down")
            time.sleep(0.1)
        assert 503 in statuses, statuses
        assert srv.proc.wait(60) is not None  # vLLM's watchdog stops the server; it does not hang
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
