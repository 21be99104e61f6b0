"""Admin API end to end on a running server: auth, load → use → rollback → retire, rejected loads leave
everything unchanged, the registry (with each set's routing) survives a restart, and /metrics moves with
traffic. Named sets and routing changes: test_named_sets.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
from api.conftest import ADMIN_TOKEN, RunningServer, start_server
from engine_harness import ids_of
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.engine

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def served_by(base: str, length: int, max_tokens: int = 8) -> str:
    r = httpx.post(
        f"{base}/v1/completions",
        json={"model": "tiny", "prompt": ids_of(length, length), "max_tokens": max_tokens},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-longrope-factor-set"]


def live(base: str) -> list[str]:
    r = httpx.get(f"{base}/admin/factors", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return [s["label"] for s in r.json()["data"]]


def extra_set(version_factor: float = 1.5, **over: object) -> dict:
    body = {
        "name": "extra",
        "factors": [1.0 + version_factor * i / 31 for i in range(32)],
        "rope_theta": 10000.0,
        "rotary_dim": 64,
        "original_max_len": 256,
        "max_len": 512,
    }
    body.update(over)
    return body


def registry_snapshot(registry: Path) -> dict[str, str]:
    return {str(p.relative_to(registry)): p.read_text() for p in sorted(registry.rglob("*.json"))}


def metric_samples(base: str, name: str) -> dict[tuple, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_auth(server: str) -> None:
    r = httpx.get(f"{server}/admin/factors", timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "authentication_error"
    r = httpx.get(f"{server}/admin/factors", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401
    assert ADMIN_TOKEN not in r.text


def test_listing(server: str) -> None:
    r = httpx.get(f"{server}/admin/factors", headers=AUTH, timeout=10).json()
    by_name = {s["name"]: s for s in r["data"]}
    assert set(by_name) >= {"original", "mid", "nhat"} and r["max_model_len"] == 2048
    nhat = by_name["nhat"]
    assert nhat["max_len"] == 2048 and nhat["n_hat"] == 4 and nhat["mscale"] == 1.25 and nhat["factors"]["count"] == 32
    assert all(by_name[n]["routing"] == "auto" for n in ("original", "mid", "nhat"))  # start-up sets: auto


BAD_LOADS = [
    (extra_set(factors=[1.0] * 31), "factors: expected 32 values"),
    (extra_set(factors=[1.0] * 31 + [float("nan")]), "every λ_i must be finite"),
    (extra_set(factors=[1.0] * 31 + [float("inf")]), "every λ_i must be finite"),
    (extra_set(factors=[-1.0] + [1.0] * 31), "every λ_i must be > 0"),
    (extra_set(factors=[0.0] + [1.0] * 31), "every λ_i must be > 0"),
    (extra_set(factors=[0.5] + [1.0] * 31), "must be ≥ 1"),
    (extra_set(n_hat=512), "n_hat: must be < max_len"),
    (extra_set(max_len=4096), "this engine serves at most 2048"),
    (extra_set(rope_theta=500000.0), "rope_theta: the set has 500000"),
    (extra_set(rotary_dim=32, factors=[1.0] * 16), "rotary_dim: the set has 32"),
    (extra_set(colour="blue"), "colour: unknown field"),
    (extra_set(name="mid", version=1), "version 1 is not newer than version 1"),
]


@pytest.mark.parametrize("body,message", BAD_LOADS, ids=[m for _, m in BAD_LOADS])
def test_rejected_load_changes_nothing(running: RunningServer, body: dict, message: str) -> None:
    before_live, before_files = live(running.base), registry_snapshot(running.registry)
    before_out = served_by(running.base, 300)
    r = httpx.post(
        f"{running.base}/admin/factors",
        content=json.dumps(body, allow_nan=True),
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    assert live(running.base) == before_live
    assert registry_snapshot(running.registry) == before_files
    assert served_by(running.base, 300) == before_out


@pytest.mark.parametrize(
    "content,ctype,status,message",
    [
        (b"{not json", "application/json", 400, "body is not valid JSON"),
        (b"", "application/json", 400, "empty body"),
        (b"[1, 2]", "application/json", 400, "expected a JSON object"),
        (b"x" * (9 * 1024 * 1024), "application/json", 413, "larger than the 8388608 byte limit"),
    ],
)
def test_bad_bodies(running: RunningServer, content: bytes, ctype: str, status: int, message: str) -> None:
    before = live(running.base)
    r = httpx.post(
        f"{running.base}/admin/factors", content=content, headers={**AUTH, "Content-Type": ctype}, timeout=60
    )
    assert r.status_code == status and message in r.json()["error"]["message"]
    assert live(running.base) == before


def test_load_use_rollback_retire_and_metrics(running: RunningServer) -> None:
    base = running.base
    assert served_by(base, 300) == "mid@1"  # 300 + 8 → smallest window ≥ 308 is mid (1024)
    before = metric_samples(base, "longrope_prompt_tokens_count")
    r = httpx.post(f"{base}/admin/factors", json=extra_set(), headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text
    assert r.json()["data"][0]["label"] == "extra@1"
    assert served_by(base, 300) == "extra@1"  # now the smallest window holding 308
    r = httpx.post(f"{base}/admin/factors", json=extra_set(3.0), headers=AUTH, timeout=30)
    assert r.json()["data"][0]["label"] == "extra@2"
    assert served_by(base, 300) == "extra@2"
    assert json.loads((running.registry / "live.json").read_text())["live"]["extra"] == 2
    r = httpx.post(f"{base}/admin/factors/extra/rollback", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["label"] == "extra@1"
    assert served_by(base, 300) == "extra@1"
    r = httpx.post(f"{base}/admin/factors/original/rollback", headers=AUTH, timeout=30)
    assert r.status_code == 400 and "no earlier version" in r.json()["error"]["message"]
    r = httpx.delete(f"{base}/admin/factors/nhat", headers=AUTH, timeout=30)
    assert r.status_code == 400 and "no set for automatic routing of 1025–2048 tokens" in r.json()["error"]["message"]
    r = httpx.delete(f"{base}/admin/factors/nosuch", headers=AUTH, timeout=30)
    assert r.status_code == 404
    after = metric_samples(base, "longrope_prompt_tokens_count")
    key = (("factor_set", "extra"), ("version", "1"))
    assert after[key] >= before.get(key, 0) + 2
    loaded = metric_samples(base, "longrope_factor_set_loaded")
    assert (("factor_set", "extra"), ("version", "1"), ("window", "512")) in loaded
    assert metric_samples(base, "longrope_hot_loads_total")[(("action", "load"), ("result", "ok"))] >= 2
    assert any(k[0][0] == "factor_set" for k in metric_samples(base, "longrope_context_tokens_count"))
    assert "vllm:num_requests_running" in httpx.get(f"{base}/metrics", timeout=30).text
    # leave the shared server as the other API tests expect it
    assert httpx.delete(f"{base}/admin/factors/extra", headers=AUTH, timeout=30).status_code == 200
    assert served_by(base, 300) == "mid@1"


def test_csv_upload_and_retire(running: RunningServer) -> None:
    base = running.base
    csv_text = ",".join(str(1.0 + i / 31) for i in range(32)) + "\n"
    files = {"file": ("small.csv", csv_text, "text/csv")}
    r = httpx.post(
        f"{base}/admin/factors", files=files, data={"name": "csvset", "max_len": "300"}, headers=AUTH, timeout=30
    )
    assert r.status_code == 201, r.text
    summary = r.json()["data"][0]
    assert summary["label"] == "csvset@1" and summary["provenance"]["method"] == "csv"
    assert math.isclose(summary["mscale"], math.sqrt(1 + math.log(300 / 256) / math.log(256)))
    assert served_by(base, 270, 8) == "csvset@1"
    r = httpx.post(f"{base}/admin/factors", files=files, data={"max_len": "300"}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "field name is required" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/admin/factors?name=csvset&max_len=300", files=files, headers=AUTH, timeout=30)
    assert r.status_code == 201 and r.json()["data"][0]["label"] == "csvset@2"  # fields as query parameters
    r = httpx.delete(f"{base}/admin/factors/csvset", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["retired"] == "csvset@2"
    assert not any(label.startswith("csvset@") for label in live(base))
    assert not served_by(base, 270, 8).startswith("csvset@")


def routes(base: str) -> list[tuple[str, str]]:
    r = httpx.get(f"{base}/admin/factors", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return [(s["label"], s["routing"]) for s in r.json()["data"]]


def test_restart_restores_registry(running: RunningServer, tiny_llama: Path, set_files: Path, tmp_path: Path) -> None:
    """A second server started on a copy of the registry serves the same live versions, with their routing:
    a set loaded for explicit use only is still explicit there (automatic routing does not pick it)."""
    import shutil

    r = httpx.post(
        f"{running.base}/admin/factors?routing=explicit", json=extra_set(name="parked", max_len=300), headers=AUTH
    )
    assert r.status_code == 201, r.text
    try:
        expected = routes(running.base)
        assert ("parked@1", "explicit") in expected
        copy = tmp_path / "registry"
        shutil.copytree(running.registry, copy)
    finally:
        assert httpx.delete(f"{running.base}/admin/factors/parked", headers=AUTH, timeout=30).status_code == 200
    second = start_server(tiny_llama, set_files, tmp_path, registry=copy)
    try:
        assert routes(second.base) == expected
        assert served_by(second.base, 270) == "mid@1"  # 278 tokens: parked (≤300) would be the smallest fit
        r = httpx.post(
            f"{second.base}/v1/completions",
            json={
                "model": "tiny",
                "prompt": ids_of(270, 1),
                "max_tokens": 8,
                "vllm_xargs": {"longrope_factor_set": "parked"},
            },
            timeout=120,
        )
        assert r.status_code == 200 and r.headers["x-longrope-factor-set"] == "parked@1", r.text
    finally:
        second.stop()


def test_admin_off_without_token(tiny_llama: Path, set_files: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_llama, set_files, tmp_path, admin=False)
    try:
        r = httpx.get(f"{srv.base}/admin/factors", headers=AUTH, timeout=10)
        assert r.status_code == 404 and "admin API is off" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.base}/admin/factors", json=extra_set(), headers=AUTH, timeout=10)
        assert r.status_code == 404
    finally:
        srv.stop()
