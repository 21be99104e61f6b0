"""Upgrade by recompute over HTTP: the set a request finished on, the sets it went through, per policy."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from engine_harness import ids_of
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.engine

PROMPT = ids_of(240, 401)  # the smallest set, original@1, has a 256-token window
NEW_TOKENS = 40  # crosses it at the 17th token


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _complete(client: openai.OpenAI, policy: str | None = None, **extra: object):
    body: dict[str, object] = {"ignore_eos": True, "return_token_ids": True, **extra}
    if policy:
        body["vllm_xargs"] = {"longrope_policy": policy}
    return client.completions.with_raw_response.create(
        model="tiny", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, extra_body=body
    )


def _sample(server: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_upgrade_reports_final_set_and_path(client: openai.OpenAI, server: str) -> None:
    upgrades_before = _sample(server, "longrope_upgrades_total", from_set="original", to_set="mid")
    recomputed_before = _sample(server, "longrope_upgrade_recompute_tokens_total")
    raw = _complete(client)  # the server's default policy: upgrade
    assert raw.headers["x-longrope-factor-set"] == "mid@1"
    assert raw.headers["x-longrope-upgrades"] == "original@1>mid@1"
    completion = raw.parse()
    assert completion.model_extra["longrope_factor_set"] == "mid@1"
    assert completion.model_extra["longrope_upgrades"] == "original@1>mid@1"
    assert completion.usage.prompt_tokens == 240 and completion.usage.completion_tokens == NEW_TOKENS
    assert completion.choices[0].finish_reason == "length"
    assert _sample(server, "longrope_upgrades_total", from_set="original", to_set="mid") == upgrades_before + 1
    # recomputed: the prompt and the 17 tokens generated on original@1 (256 + 1)
    assert _sample(server, "longrope_upgrade_recompute_tokens_total") == recomputed_before + 257
    assert _sample(server, "longrope_upgrade_recompute_seconds_count") >= 1


def test_streamed_upgrade_equals_non_streamed(client: openai.OpenAI, server: str) -> None:
    whole = _complete(client).parse()
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as response:
        assert response.headers["x-longrope-factor-set"] == "original@1"  # headers go out before the move
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    token_chunks = [e for e in events if e["choices"] and e["choices"][0].get("token_ids")]
    streamed = [t for e in token_chunks for t in e["choices"][0]["token_ids"]]
    assert streamed == whole.choices[0].model_extra["token_ids"]
    assert "".join(e["choices"][0]["text"] for e in token_chunks) == whole.choices[0].text
    sets = [e["longrope_factor_set"] for e in token_chunks]
    assert sets[0] == "original@1" and sets[-1] == "mid@1"
    assert sets == sorted(sets, key=lambda s: s != "original@1"), "chunks went back to the old set"
    assert all(
        e.get("longrope_upgrades") == "original@1>mid@1" for e in token_chunks if e["longrope_factor_set"] == "mid@1"
    )
    finishes = [e["choices"][0].get("finish_reason") for e in events if e["choices"]]
    assert [f for f in finishes if f] == ["length"], "the phase that moved up was reported as finished"


def test_pin_stops_at_the_window_and_reserve_starts_large(client: openai.OpenAI) -> None:
    pinned = _complete(client, "pin")
    assert pinned.headers["x-longrope-factor-set"] == "original@1" and "x-longrope-upgrades" not in pinned.headers
    assert pinned.parse().usage.completion_tokens == 256 - 240
    assert pinned.parse().choices[0].finish_reason == "length"
    reserved = _complete(client, "reserve")  # 240 + 40 > 256: admitted on mid@1 from the start
    assert reserved.headers["x-longrope-factor-set"] == "mid@1" and "x-longrope-upgrades" not in reserved.headers
    assert reserved.parse().usage.completion_tokens == NEW_TOKENS


def test_chat_upgrade(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[{"role": "user", "content": "count " * 150}],
        max_tokens=120,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    usage = raw.parse().usage
    assert usage.prompt_tokens < 256 < usage.prompt_tokens + usage.completion_tokens
    assert raw.headers["x-longrope-upgrades"] == "original@1>mid@1"
    assert raw.parse().model_extra["longrope_factor_set"] == "mid@1"


def test_bad_policy_is_an_openai_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, "sometimes")
    assert "longrope_policy must be one of upgrade, reserve, pin; got 'sometimes'" in str(err.value)
