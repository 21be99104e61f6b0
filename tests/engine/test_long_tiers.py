"""Tiers up to 2048k in a real engine (vLLM CPU build, tiny model): no RoPE memory per window position, exact
outputs on a million-token tier, fast back-to-back 2048k hot-loads, and a worker that cannot take a set."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from engine_harness import (
    ENGINE_KWARGS,
    TorchReference,
    collect,
    ids_of,
    max_logprob_error,
    prompt_logprob_list,
    scoped_env,
)
from faulty_worker import FAIL_PREFIX, FAULT, QUALNAME
from tiny_models import write_set

pytestmark = pytest.mark.engine

MILLION = 1_048_576
TWO_MILLION = 2_097_152
PAIRS = 32
TOKEN = "tiers-admin-token"


def _lam(top: float, power: float = 1.0) -> list[float]:
    return [1.0 + (top - 1.0) * (i / (PAIRS - 1)) ** power for i in range(PAIRS)]


@pytest.fixture(scope="module")
def tier_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiers")
    write_set(folder, "t2k", _lam(8.0, 2.0), 2048)
    write_set(folder, "t1m", _lam(4096.0), MILLION, n_hat=16, mscale=1.7)
    write_set(folder, "t2m", _lam(8192.0, 1.5), TWO_MILLION, n_hat=8)
    return folder


@pytest.fixture(scope="module")
def tiers(loop, tiny_llama: Path, tier_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """original (256) + 2k + 1M + 2M on the tiny model, with a registry and a worker extension whose load
    fails for sets named ``fail-*``. The KV cache must hold one 2M-token sequence (1 KiB per token)."""
    from server.engine import EngineSettings, LongRopeEngine

    settings = EngineSettings(
        model=str(tiny_llama),
        factor_paths=[str(tier_files)],
        default_reserve=16,
        registry_dir=str(tmp_path_factory.mktemp("tiers-registry")),
        worker_extension=QUALNAME,
        engine_kwargs={**ENGINE_KWARGS, "max_num_seqs": 4},
    )
    with scoped_env(VLLM_CPU_KVCACHE_SPACE="3"):
        eng = loop.run(LongRopeEngine.start(settings))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> TorchReference:
    return TorchReference(str(tiny_llama))


def test_million_token_tier_serves_short_and_long_prompts_exactly(tiers, loop, reference) -> None:
    assert tiers.max_model_len == TWO_MILLION
    cases = [(100, "original"), (1500, "t2k"), (3000, "t1m")]
    prompts = [ids_of(n, 300 + n) for n, _ in cases]

    async def together():
        return await asyncio.gather(*(collect(tiers, ids, f"tier-{len(ids)}", 6) for ids in prompts))

    for (n, name), ids, out in zip(cases, prompts, loop.run(together()), strict=True):
        assert tiers.assign(n, 6).set.name == name
        assert out.outputs[0].finish_reason == "length"
        fs = tiers.table.get(name)
        ref = reference.prompt_logprobs(ids, fs.factors, fs.n_hat, fs.resolved_mscale)
        got = prompt_logprob_list(out, ids)
        print(
            f"{name} ({n} tokens): max |Δ prompt logprob| = {max(abs(a - b) for a, b in zip(got, ref, strict=True)):.2e}"
        )
        assert max_logprob_error(got, ref) <= 1
        assert list(out.outputs[0].token_ids) == reference.greedy(ids, 6, fs.factors, fs.n_hat, fs.resolved_mscale)


def test_ten_back_to_back_2048k_loads(tiers, loop, reference) -> None:
    """Each load returns in < 1 s on an idle engine, the next request runs on it, RoPE memory stays put and
    replaced versions are dropped from the worker."""
    (before,) = loop.run(tiers.worker_status())
    ids = ids_of(200, 77)
    seconds = []
    for k in range(10):
        fresh = tiers.table.get("t2m").with_updates(factors=_lam(8192.0 - 300.0 * k, 1.5), version=None)
        t0 = time.monotonic()
        loaded = loop.run(tiers.load_set(fresh))
        seconds.append(time.monotonic() - t0)
        assert loaded.label == f"t2m@{k + 2}"
        # reserve with a budget past 1M puts a short prompt on the 2M tier
        loop.run(collect(tiers, ids, f"after-load-{k}", 2, policy="reserve", requested_max_tokens=1_200_000))
        assert tiers.served[loaded.label] == 1, "the first request after the load did not run on it"
    print("2048k hot-loads (s):", ", ".join(f"{s:.3f}" for s in seconds))
    assert max(seconds) < 1.0
    fs = tiers.table.get("t2m")
    (after,) = loop.run(tiers.worker_status())
    assert after["rope_bytes"] == before["rope_bytes"] <= 16 * 2**20
    assert "t2m@11" in after["slots"] and not any(f"t2m@{v}" in after["slots"] for v in range(1, 11))
    assert fs.label == "t2m@11"


def test_request_on_new_2048k_version_matches_reference(tiers, loop, reference) -> None:
    ids = ids_of(400, 99)
    out = loop.run(collect(tiers, ids, "t2m-newest", 4, policy="reserve", requested_max_tokens=1_200_000))
    fs = tiers.table.get("t2m")
    assert fs.label == "t2m@11" and tiers.served[fs.label] == 2
    ref = reference.prompt_logprobs(ids, fs.factors, fs.n_hat, fs.resolved_mscale)
    assert max_logprob_error(prompt_logprob_list(out, ids), ref) <= 1


def _admin_app(engine):
    from fastapi import FastAPI

    from server.admin import install_admin

    app = FastAPI()
    install_admin(app, engine, TOKEN)
    return app


def test_worker_failure_is_an_openai_error_and_changes_nothing(tiers, loop, tmp_path: Path) -> None:
    """The admin API over the real ASGI app; the failure is raised inside the engine's worker process."""
    registry = Path(tiers.registry.root)
    files_before = {p.name: p.read_bytes() for p in registry.rglob("*") if p.is_file() and p.name != ".lock"}
    probe = ids_of(120, 5)
    before = loop.run(collect(tiers, probe, "probe-before", 8, prompt_logprobs=False))
    bad = tiers.table.get("t2m").with_updates(name=f"{FAIL_PREFIX}2m", version=None)
    replacement = tiers.table.get("t1m").with_updates(name="t1m", version=None)
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def admin_calls():
        transport = httpx.ASGITransport(app=_admin_app(tiers))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin", headers=headers) as client:
            listing = (await client.get("/admin/factors")).json()
            failed = await client.post("/admin/factors", content=bad.model_dump_json())
            again = (await client.get("/admin/factors")).json()
            return listing, failed, again

    listing, failed, again = loop.run(admin_calls())
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["type"] == "worker_error" and error["code"] == 500
    assert FAULT in error["message"] and f"{FAIL_PREFIX}2m@1" in error["message"]
    assert "nothing was changed" in error["message"]
    assert again == listing
    files_after = {p.name: p.read_bytes() for p in registry.rglob("*") if p.is_file() and p.name != ".lock"}
    assert files_after == files_before, "the registry changed after a refused load"
    (status,) = loop.run(tiers.worker_status())
    assert not any(k.startswith(FAIL_PREFIX) for k in status["slots"])
    after = loop.run(collect(tiers, probe, "probe-after", 8, prompt_logprobs=False))
    assert list(after.outputs[0].token_ids) == list(before.outputs[0].token_ids)
    # and the engine still takes a good set through the same path
    assert loop.run(tiers.load_set(replacement)).label == "t1m@2"
    assert json.loads(failed.text)["error"]["param"] is None
