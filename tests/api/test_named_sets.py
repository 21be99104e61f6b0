"""A request that names its factor set, and sets loaded for explicit use only (A/B before they take traffic),
over HTTP with the real openai SDK on the shared server: naming gets exactly that set (same tokens as when
automatic routing picks it), its 400s, promote / demote, rollback and retire with routing, every refused
admin call leaving the listing and the registry as they were, and the client and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from api.conftest import ADMIN_TOKEN, RunningServer
from engine_harness import ids_of
from prometheus_client.parser import text_string_to_metric_families

from clients.client import AdminClient, LongRopeError, factor_set_of, named_set, openai_client

pytestmark = pytest.mark.engine

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLI = str(Path(sys.executable).parent / "longrope-client")
# original@1 (≤256) < probe (≤300) < mid@1 (≤1024) < nhat@1 (≤2048): automatic routing would pick probe for
# prompts of 257–300 tokens if it could.
PROMPT = ids_of(270, 2270)


def probe_set(spread: float = 2.0, name: str = "probe", max_len: int = 300) -> dict[str, Any]:
    return {
        "name": name,
        "factors": [1.0 + spread * i / 31 for i in range(32)],
        "rope_theta": 10000.0,
        "rotary_dim": 64,
        "original_max_len": 256,
        "max_len": max_len,
    }


def listing(base: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{base}/admin/factors", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def registry_snapshot(registry: Path) -> dict[str, str]:
    return {str(p.relative_to(registry)): p.read_text() for p in sorted(registry.rglob("*.json"))}


def prompt_count(base: str, name: str, version: int) -> float:
    """How many prompts ``longrope_prompt_tokens`` counted on a set version."""
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == "longrope_prompt_tokens_count" and s.labels == {"factor_set": name, "version": str(version)}:
                return s.value
    return 0.0


def chat_of_length(base: str, length: int) -> list[dict[str, str]]:
    """Chat messages whose prompt (template included) is exactly ``length`` tokens, measured by /tokenize."""

    def count(words: int) -> tuple[list[dict[str, str]], int]:
        messages = [{"role": "user", "content": "a" + " a" * (words - 1)}]
        r = httpx.post(f"{base}/tokenize", json={"model": "tiny", "messages": messages}, timeout=30)
        assert r.status_code == 200, r.text
        return messages, r.json()["count"]

    _, overhead = count(1)
    messages, n = count(length - overhead + 1)
    assert n == length, f"'a' * k does not tokenise one token a word here ({n} != {length})"
    return messages


def routing_of(base: str) -> dict[str, str]:
    return {s["name"]: s["routing"] for s in listing(base)}


def set_routing(base: str, name: str, body: Any) -> httpx.Response:
    return httpx.post(f"{base}/admin/factors/{name}/routing", json=body, headers=AUTH, timeout=30)


def complete(client: openai.OpenAI, prompt: list[int], max_tokens: int, name: str | None = None, **extra: Any):
    body: dict[str, Any] = {"return_token_ids": True, "ignore_eos": True, **extra}
    if name is not None:
        body["vllm_xargs"] = {**body.get("vllm_xargs", {}), **named_set(name)["vllm_xargs"]}
    return client.completions.with_raw_response.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body
    )


def tokens(raw: Any) -> list[int]:
    return raw.parse().choices[0].model_extra["token_ids"]


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai_client(server, max_retries=0)


@pytest.fixture(scope="module")
def probe(running: RunningServer) -> Iterator[str]:
    """``probe`` loaded with routing explicit; retired afterwards so the shared server is as it was."""
    r = httpx.post(f"{running.base}/admin/factors?routing=explicit", json=probe_set(), headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text
    assert [(s["label"], s["routing"]) for s in r.json()["data"]] == [("probe@1", "explicit")]
    yield "probe"
    r = httpx.delete(f"{running.base}/admin/factors/probe", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text


def test_a_named_set_serves_exactly_its_requests_until_promoted(
    running: RunningServer, client: openai.OpenAI, probe: str
) -> None:
    base = running.base
    routes = routing_of(base)
    assert routes["probe"] == "explicit" and {routes[n] for n in ("original", "mid", "nhat")} == {"auto"}
    shown = httpx.get(f"{base}/admin/factors/probe", headers=AUTH, timeout=30).json()
    assert (shown["label"], shown["routing"], shown["max_len"]) == ("probe@1", "explicit", 300)
    assert json.loads((running.registry / "live.json").read_text())["explicit"] == ["probe"]
    # automatic routing never picks it, though its window is the smallest that holds the request
    for policy in ("upgrade", "reserve", "pin"):
        auto = complete(client, PROMPT, 8, vllm_xargs={"longrope_policy": policy})
        assert auto.headers["x-longrope-factor-set"] == "mid@1", policy
    before = prompt_count(base, "probe", 1)
    named = complete(client, PROMPT, 8, "probe")
    assert named.headers["x-longrope-factor-set"] == "probe@1" and "x-longrope-upgrades" not in named.headers
    assert named.parse().model_extra["longrope_factor_set"] == "probe@1"
    assert prompt_count(base, "probe", 1) == before + 1  # metrics as for any set
    # streamed and chat requests name it the same way
    with client.completions.with_streaming_response.create(
        model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, stream=True, extra_body=named_set(probe)
    ) as response:
        assert response.headers["x-longrope-factor-set"] == "probe@1"
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks and all(c["longrope_factor_set"] == "probe@1" for c in chunks)
    # chat too; without max_tokens a named request runs to its set's window and stops there, never moving up
    chat = client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        temperature=0,
        extra_body={"ignore_eos": True, **named_set(probe)},
    )
    assert factor_set_of(chat) == "probe@1" and chat.parse().model_extra["longrope_factor_set"] == "probe@1"
    assert "x-longrope-upgrades" not in chat.headers and chat.parse().choices[0].finish_reason == "length"
    assert chat.parse().usage.prompt_tokens + chat.parse().usage.completion_tokens == 300
    # promoted, automatic routing picks it for the same request: the same greedy tokens
    r = set_routing(base, probe, {"routing": "auto"})
    assert r.status_code == 200 and (r.json()["label"], r.json()["routing"]) == ("probe@1", "auto"), r.text
    assert json.loads((running.registry / "live.json").read_text())["explicit"] == []
    promoted = complete(client, PROMPT, 8)
    assert promoted.headers["x-longrope-factor-set"] == "probe@1" and tokens(promoted) == tokens(named)
    # demoted again, automatic routing is back on mid
    r = set_routing(base, probe, {"routing": "explicit"})
    assert r.status_code == 200 and r.json()["routing"] == "explicit"
    assert complete(client, PROMPT, 8).headers["x-longrope-factor-set"] == "mid@1"


def test_naming_an_auto_set_equals_automatic_routing_to_it(server: str, client: openai.OpenAI) -> None:
    """100 + 160 tokens: ``reserve`` puts it on mid@1; naming mid gives the same tokens, and naming changes
    the computation (prompt logprobs differ from the same prompt on original@1)."""
    prompt = ids_of(100, 2100)
    reserved = complete(client, prompt, 160, vllm_xargs={"longrope_policy": "reserve"})
    named = complete(client, prompt, 160, "mid")
    assert reserved.headers["x-longrope-factor-set"] == named.headers["x-longrope-factor-set"] == "mid@1"
    assert tokens(named) == tokens(reserved) and len(tokens(named)) == 160

    def prompt_logprobs(name: str | None) -> list[float]:
        body: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0}
        if name:
            body["vllm_xargs"] = named_set(name)["vllm_xargs"]
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return [next(iter(p.values()))["logprob"] for p in r.json()["choices"][0]["prompt_logprobs"][1:]]

    on_mid, on_original = prompt_logprobs("mid"), prompt_logprobs(None)
    assert max(abs(a - b) for a, b in zip(on_mid, on_original, strict=True)) > 1e-3


def test_named_request_errors_are_openai_400s_and_change_nothing(
    running: RunningServer, client: openai.OpenAI, probe: str
) -> None:
    base = running.base
    before = listing(base)
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, PROMPT, 8, "nosuch")
    message = err.value.body["message"]
    assert "longrope_factor_set 'nosuch' is not a live factor set; live: original@1 (≤256)" in message
    assert "probe@1 (≤300, explicit)" in message and "nhat@1 (≤2048)" in message
    assert err.value.body["param"] == "vllm_xargs.longrope_factor_set"
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, ids_of(290, 1), 20, probe)
    assert "prompt (290 tokens) + max_tokens (20) = 310 tokens exceeds the window of probe@1" in str(err.value)
    assert "of 300 tokens; ask for max_tokens ≤ 10" in str(err.value)
    # a chat without max_tokens is admitted on prompt + the server's default reserve (16 here)
    messages = chat_of_length(base, 290)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=messages, extra_body=named_set(probe))
    assert "prompt (290 tokens) + the default reserve (16; no max_tokens sent) = 306 tokens" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=400,
            extra_body=named_set("original"),
        )
    assert "exceeds the window of original@1" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, PROMPT, 8, probe, vllm_xargs={"longrope_policy": "upgrade"})
    assert "longrope_policy 'upgrade' cannot apply to a request naming its set" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, PROMPT, 8, vllm_xargs={"longrope_factor_set": 3})
    assert "must be the name of a live factor set, got 3" in str(err.value)
    assert listing(base) == before  # nothing counted, nothing in flight
    assert complete(client, PROMPT, 8, probe).headers["x-longrope-factor-set"] == "probe@1"


def _refused_calls(base: str) -> list[tuple[Callable[[], httpx.Response], int, str]]:
    """Admin calls that must be refused, with their status and a part of their message."""

    def post(path: str, **kw: Any) -> Callable[[], httpx.Response]:
        return lambda: httpx.post(f"{base}{path}", timeout=30, **kw)

    def routing(name: str, body: Any) -> Callable[[], httpx.Response]:
        return lambda: set_routing(base, name, body)

    return [
        (routing("nosuch", {"routing": "auto"}), 404, "no live set named 'nosuch'"),
        (routing("probe", {"routing": "sometimes"}), 400, "routing must be one of auto, explicit; got 'sometimes'"),
        (routing("probe", {"routing": "auto", "extra": 1}), 400, "exactly the field routing"),
        (routing("probe", ["auto"]), 400, "exactly the field routing"),
        (post("/admin/factors/probe/routing", content=b"{", headers=AUTH), 400, "body is not valid JSON"),
        (routing("nhat", {"routing": "explicit"}), 400, "no set for automatic routing of 1025–2048 tokens"),
        (post("/admin/factors/probe/routing", json={"routing": "auto"}), 401, "missing or wrong admin token"),
        (
            post("/admin/factors?routing=sometimes", json=probe_set(name="other"), headers=AUTH),
            400,
            "routing must be one of auto, explicit; got 'sometimes'",
        ),
        (
            post("/admin/factors?routing=explicit", json=probe_set(name="nhat", max_len=2048), headers=AUTH),
            400,
            "loading nhat with routing explicit would take it out of automatic routing",
        ),
        (lambda: httpx.delete(f"{base}/admin/factors/nhat", headers=AUTH), 400, "retiring nhat@1 would leave no set"),
        (lambda: httpx.get(f"{base}/admin/factors/nosuch", headers=AUTH), 404, "no live set named 'nosuch'"),
    ]


def test_rejected_admin_calls_change_nothing(running: RunningServer, probe: str) -> None:
    before, files = listing(running.base), registry_snapshot(running.registry)
    for call, status, message in _refused_calls(running.base):
        response = call()
        error = response.json()["error"]
        assert (response.status_code, set(error)) == (status, {"message", "type", "param", "code"}), response.text
        assert message in error["message"], error
        assert listing(running.base) == before, message
        assert registry_snapshot(running.registry) == files, message


def test_new_versions_and_rollback_keep_the_routing(running: RunningServer, client: openai.OpenAI, probe: str) -> None:
    base = running.base
    r = httpx.post(f"{base}/admin/factors", json=probe_set(3.0), headers=AUTH, timeout=30)
    assert r.status_code == 201 and (r.json()["data"][0]["label"], r.json()["data"][0]["routing"]) == (
        "probe@2",
        "explicit",
    )
    assert complete(client, PROMPT, 4).headers["x-longrope-factor-set"] == "mid@1"
    assert complete(client, PROMPT, 4, probe).headers["x-longrope-factor-set"] == "probe@2"
    r = httpx.post(f"{base}/admin/factors/probe/rollback", headers=AUTH, timeout=30)
    assert r.status_code == 200 and (r.json()["label"], r.json()["routing"]) == ("probe@1", "explicit")
    assert complete(client, PROMPT, 4, probe).headers["x-longrope-factor-set"] == "probe@1"


def test_client_and_cli(running: RunningServer, tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "LONGROPE_URL": running.base,
        "LONGROPE_ADMIN_TOKEN": ADMIN_TOKEN,
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=120)

    path = tmp_path / "ab.json"
    path.write_text(json.dumps(probe_set(1.5, name="ab")))
    out = cli("factors", "load", str(path), "--routing", "explicit")
    assert out.returncode == 0 and "loaded ab@1 (window 300), routing explicit" in out.stdout, out.stderr
    out = cli("factors", "list")
    assert out.returncode == 0 and any(
        line.startswith("ab@1") and " explicit " in line for line in out.stdout.splitlines()
    )
    out = cli("complete", "Once upon a time", "--max-tokens", "3", "--factor-set", "ab")
    assert out.returncode == 0 and "[factor set: ab@1]" in out.stderr, out.stderr
    out = cli("chat", "hi", "--max-tokens", "3", "--factor-set", "nosuch")
    assert out.returncode == 2 and "'nosuch' is not a live factor set" in out.stderr and "HTTP 400" in out.stderr
    out = cli("factors", "routing", "ab", "auto")
    assert out.returncode == 0 and "ab@1 routing auto" in out.stdout
    out = cli("factors", "routing", "nhat", "explicit")
    assert out.returncode == 2 and "no set for automatic routing of 1025–2048 tokens" in out.stderr
    with AdminClient(running.base, ADMIN_TOKEN) as admin:
        assert admin.get("ab").routing == "auto"
        assert admin.set_routing("ab", "explicit").routing == "explicit"
        (v2,) = admin.load(probe_set(2.5, name="ab"), routing="auto")
        assert (v2.label, v2.routing) == ("ab@2", "auto")
        with pytest.raises(LongRopeError) as err:
            admin.set_routing("nosuch", "auto")
        assert err.value.status == 404
        assert admin.retire("ab") == "ab@2"
        assert "ab" not in {s.name for s in admin.list()}
