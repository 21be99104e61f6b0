"""Two server processes sharing one registry: a set loaded, or rolled back, through one is served by both."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from api.conftest import ADMIN_TOKEN, start_server
from engine_harness import ids_of

pytestmark = pytest.mark.engine

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _served_set(base: str, length: int = 400) -> str:
    body = {"model": "tiny", "prompt": ids_of(length, 77), "max_tokens": 2, "temperature": 0}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-longrope-factor-set"]


def _wait_for(base: str, expected: str, timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _served_set(base) == expected:
            return time.monotonic() - t0
        time.sleep(0.25)
    raise AssertionError(f"{base} still serves {_served_set(base)}, not {expected}, after {timeout} s")


def test_hot_load_and_rollback_reach_the_other_replica(tiny_llama: Path, set_files: Path, tmp_path: Path) -> None:
    registry = tmp_path / "shared-registry"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = start_server(tiny_llama, set_files, tmp_path / "a", registry=registry)
    try:
        b = start_server(tiny_llama, set_files, tmp_path / "b", registry=registry)
        try:
            assert _served_set(a.base) == _served_set(b.base) == "mid@1"
            new_mid = {
                **json.loads((set_files / "mid.json").read_text()),
                "factors": [1.0 + 2.0 * i / 31 for i in range(32)],
            }
            r = httpx.post(f"{a.base}/admin/factors", json=new_mid, headers=AUTH, timeout=60)
            assert r.status_code == 201, r.text
            assert _served_set(a.base) == "mid@2"
            waited = _wait_for(b.base, "mid@2")
            print(f"replica b served mid@2 {waited:.2f} s after replica a loaded it")
            r = httpx.post(f"{b.base}/admin/factors/mid/rollback", headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
            assert _served_set(b.base) == "mid@1"
            _wait_for(a.base, "mid@1")
            assert "registry sync: mid@1 -> mid@2" in b.log.read_text()
        finally:
            b.stop()
    finally:
        a.stop()
