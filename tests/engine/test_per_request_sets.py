"""Real vLLM (CPU build) engine: each request gets its own LongRoPE set, equal to an independent reference."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from engine_harness import TorchReference, collect, ids_of, max_logprob_error, prompt_logprob_list

from factors import FactorSet, FactorSetError
from server.policy import RequestTooLong

pytestmark = pytest.mark.engine

GREEDY_TOKENS = 8


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> TorchReference:
    return TorchReference(str(tiny_llama))


# (prompt length, max_tokens, expected set): the smallest window ≥ prompt (+ max_tokens under ``reserve``)
CASES = [(100, GREEDY_TOKENS, "original"), (400, GREEDY_TOKENS, "mid"), (1500, GREEDY_TOKENS, "nhat")]


def _check(engine, reference: TorchReference, out, ids: list[int], set_name: str) -> float:
    fs: FactorSet = engine.table.get(set_name)
    ref_lp = reference.prompt_logprobs(ids, fs.factors, fs.n_hat, fs.resolved_mscale)
    got_lp = prompt_logprob_list(out, ids)
    diff = max(abs(a - b) for a, b in zip(got_lp, ref_lp, strict=True))
    assert max_logprob_error(got_lp, ref_lp) <= 1, f"{set_name}: prompt logprobs differ by {diff:.3g}"
    ref_tokens = reference.greedy(ids, GREEDY_TOKENS, fs.factors, fs.n_hat, fs.resolved_mscale)
    assert list(out.outputs[0].token_ids) == ref_tokens, f"{set_name}: greedy tokens differ"
    return diff


def test_startup_sets(engine) -> None:
    labels = [fs.label for fs in engine.table.sets]
    assert labels == ["original@1", "mid@1", "nhat@1"]
    assert engine.max_model_len == 2048


def test_worker_holds_the_sets(engine, loop) -> None:
    (status,) = loop.run(engine.worker_status())
    assert set(status["slots"]) == {"original@1", "mid@1", "nhat@1"}
    # RoPE state is per-step buffers plus a few numbers per set, not rows per window position
    assert status["rope_bytes"] <= 16 * 2**20


@pytest.mark.parametrize("length,max_tokens,expected", CASES)
def test_each_set_matches_reference(engine, loop, reference, length, max_tokens, expected) -> None:
    ids = ids_of(length, seed=length)
    assert engine.assign(length, max_tokens).set.name == expected
    out = loop.run(collect(engine, ids, f"single-{length}", max_tokens))
    diff = _check(engine, reference, out, ids, expected)
    print(f"{expected}: max |Δ prompt logprob| = {diff:.2e}")


def test_mixed_batch_matches_reference(engine, loop, reference) -> None:
    prompts = [(ids_of(length, seed=1000 + length), mt, name) for length, mt, name in CASES]

    async def all_at_once():
        return await asyncio.gather(*(collect(engine, ids, f"mixed-{i}", mt) for i, (ids, mt, _) in enumerate(prompts)))

    outs = loop.run(all_at_once())
    for out, (ids, _, name) in zip(outs, prompts, strict=True):
        diff = _check(engine, reference, out, ids, name)
        print(f"mixed batch {name}: max |Δ prompt logprob| = {diff:.2e}")


def test_prefix_cache_is_not_shared_across_sets(engine, loop) -> None:
    ids = ids_of(300, seed=7)  # two full KV blocks of 128 tokens (the CPU backend's block size)
    assert engine.assign(300, 4).set.name == "mid" and engine.assign(300, 800, "reserve").set.name == "nhat"
    first = loop.run(collect(engine, ids, "pc-a1", 4, prompt_logprobs=False))
    again = loop.run(collect(engine, ids, "pc-a2", 4, prompt_logprobs=False))
    assert first.num_cached_tokens == 0 and again.num_cached_tokens >= 256  # same set: hit
    # the same prompt admitted on nhat (reserve: prompt + max_tokens > mid's window)
    other = loop.run(collect(engine, ids, "pc-b", 800, prompt_logprobs=False, policy="reserve"))
    assert other.num_cached_tokens == 0, "a request of another set reused cached blocks"


def test_too_long_and_bad_sets_are_refused_and_engine_keeps_serving(engine, loop) -> None:
    with pytest.raises(RequestTooLong, match="the prompt has 2100 tokens, but the largest factor set window is 2048"):
        loop.run(collect(engine, ids_of(2100, 1), "too-long", 4))
    with pytest.raises(RequestTooLong, match=r"ask for max_tokens ≤ 1948"):
        loop.run(collect(engine, ids_of(100, 1), "too-much", 2000))
    bad = engine.table.get("mid").with_updates(name="wide", rope_theta=500000.0, version=None)
    with pytest.raises(FactorSetError, match="rope_theta: the set has 500000, the model's base is 10000"):
        loop.run(engine.load_set(bad))
    huge = engine.table.get("mid").with_updates(name="huge", max_len=4096, version=None)
    with pytest.raises(FactorSetError, match="window 4096, but this engine serves at most 2048"):
        loop.run(engine.load_set(huge))
    assert [fs.label for fs in engine.table.sets] == ["original@1", "mid@1", "nhat@1"]
    out = loop.run(collect(engine, ids_of(50, 2), "after-errors", 4, prompt_logprobs=False))
    assert len(out.outputs[0].token_ids) == 4


def test_hot_load_keeps_running_request_on_its_version(engine, loop, reference) -> None:
    from vllm import SamplingParams

    ids = ids_of(300, seed=11)
    baseline = loop.run(collect(engine, ids, "hl-baseline", 150, prompt_logprobs=False))
    assert engine.table.get("mid").version == 1
    new_factors = [1.0 + 2.0 * (i / 31) for i in range(32)]
    new_mid = engine.table.get("mid").with_updates(factors=new_factors, version=None)

    async def during_load():
        params = SamplingParams(temperature=0.0, max_tokens=150)
        gen = engine.generate({"prompt_token_ids": ids}, params, "hl-old")
        first = await gen.__anext__()
        assert engine.assignments["hl-old"].key == "mid@1"
        loaded = await engine.load_set(new_mid)
        outputs = [first]
        async for out in gen:
            outputs.append(out)
        return loaded, outputs[-1]

    loaded, old = loop.run(during_load())
    assert loaded.label == "mid@2"
    assert list(old.outputs[0].token_ids) == list(baseline.outputs[0].token_ids), "running request was altered"
    new = loop.run(collect(engine, ids, "hl-new", 8))
    fs = engine.table.get("mid")
    assert fs.label == "mid@2" and engine.served["mid@2"] >= 1
    ref_lp = reference.prompt_logprobs(ids, fs.factors, fs.n_hat, fs.resolved_mscale)
    assert max_logprob_error(prompt_logprob_list(new, ids), ref_lp) <= 1
    (status,) = loop.run(engine.worker_status())
    assert "mid@2" in status["slots"] and "mid@1" not in status["slots"]
