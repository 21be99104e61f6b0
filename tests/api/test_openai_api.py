"""The HTTP server over the real engine, through the real openai SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from engine_harness import ids_of

from server.protocol import FACTOR_SET_FIELD, FACTOR_SET_HEADER

pytestmark = pytest.mark.engine


@pytest.fixture(scope="session")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("length,max_tokens,expected", [(100, 8, "original@1"), (400, 8, "mid@1"), (1500, 8, "nhat@1")])
def test_completion_reports_its_set(client: openai.OpenAI, length: int, max_tokens: int, expected: str) -> None:
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt=ids_of(length, length), max_tokens=max_tokens, temperature=0
    )
    assert raw.headers["x-longrope-factor-set"] == expected
    completion = raw.parse()
    assert completion.model_extra["longrope_factor_set"] == expected  # the same in the JSON body
    assert completion.usage.prompt_tokens == length and completion.usage.completion_tokens == max_tokens


def test_without_max_tokens_smallest_set_and_capped_generation(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt=ids_of(200, 3), temperature=0, extra_body={"vllm_xargs": {"longrope_policy": "reserve"}}
    )
    assert raw.headers["x-longrope-factor-set"] == "original@1"  # 200 + reserve 16 ≤ 256
    completion = raw.parse()
    assert completion.usage.completion_tokens <= 56  # capped at the set's window of 256
    if completion.usage.completion_tokens == 56:
        assert completion.choices[0].finish_reason == "length"


def test_streaming_has_header(client: openai.OpenAI) -> None:
    """The header, the set in every chunk, and the streamed tokens joined equal the non-streamed greedy output.
    How many chunks carry them is not a property: vLLM merges deltas when the consumer falls behind."""
    prompt, ids_body = ids_of(400, 4), {"return_token_ids": True}
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, extra_body=ids_body)
    with client.completions.with_streaming_response.create(
        model="tiny",
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=ids_body,
    ) as response:
        assert response.headers[FACTOR_SET_HEADER] == "mid@1"
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events and all(e[FACTOR_SET_FIELD] == "mid@1" for e in events)
    token_chunks = [e for e in events if e["choices"]]
    streamed = [t for e in token_chunks for t in e["choices"][0].get("token_ids") or []]
    assert whole.usage.completion_tokens == 6 and streamed == whole.choices[0].model_extra["token_ids"]
    assert "".join(e["choices"][0]["text"] for e in token_chunks) == whole.choices[0].text
    assert events[-1]["usage"]["completion_tokens"] == 6


def test_chat_completion(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=5, temperature=0
    )
    assert raw.headers["x-longrope-factor-set"] == "original@1"
    assert raw.parse().usage.completion_tokens == 5
    assert raw.parse().model_extra["longrope_factor_set"] == "original@1"


def test_too_long_is_an_openai_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=ids_of(2100, 5), max_tokens=4)
    # vLLM's renderer refuses it first (the engine window is the largest set window)
    assert "maximum context length is 2048 tokens" in str(err.value) and "2100" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=ids_of(100, 5), max_tokens=2000)
    assert "ask for max_tokens ≤ 1948" in str(err.value)
    ok = client.completions.create(model="tiny", prompt=ids_of(50, 6), max_tokens=3)
    assert ok.usage.completion_tokens == 3


def test_prompt_logprobs_extra_field_still_works(server: str) -> None:
    ids = ids_of(30, 9)
    body = {"model": "tiny", "prompt": ids, "max_tokens": 2, "prompt_logprobs": 0, "temperature": 0}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["x-longrope-factor-set"] == "original@1"
    assert len(r.json()["choices"][0]["prompt_logprobs"]) == 30


def test_models_lists_the_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_streaming_has_header(client: openai.OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="tiny", messages=[{"role": "user", "content": "stream please"}], max_tokens=4, temperature=0, stream=True
    ) as response:
        assert response.headers["x-longrope-factor-set"] == "original@1"
        assert any(line.startswith("data: ") for line in response.iter_lines())
