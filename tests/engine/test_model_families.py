"""Per-request sets on the other model families LongRoPE sets are published for or applied to: tiny Mistral
and Qwen2 models in a real engine, several sets in one batch, each equal to the independent reference."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from engine_harness import ENGINE_KWARGS, TorchReference, collect, ids_of, max_logprob_error, prompt_logprob_list

pytestmark = pytest.mark.engine

CASES = [(100, "original"), (400, "mid"), (1500, "nhat")]
GREEDY_TOKENS = 6


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def family(request: pytest.FixtureRequest, loop, default_model: Path, set_files: Path, tmp_path_factory):
    from tiny_models import make_tiny_model

    from server.engine import EngineSettings, LongRopeEngine

    folder = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), default_model, request.param)
    settings = EngineSettings(
        model=str(folder), factor_paths=[str(set_files)], default_reserve=16, engine_kwargs=dict(ENGINE_KWARGS)
    )
    eng = loop.run(LongRopeEngine.start(settings))
    yield request.param, eng, TorchReference(str(folder))
    eng.shutdown()


def test_mixed_sets_in_one_batch_match_reference(family, loop) -> None:
    name, engine, reference = family
    prompts = [ids_of(n, 2000 + n) for n, _ in CASES]

    async def together():
        return await asyncio.gather(*(collect(engine, ids, f"{name}-{len(ids)}", GREEDY_TOKENS) for ids in prompts))

    for (n, set_name), ids, out in zip(CASES, prompts, loop.run(together()), strict=True):
        assert engine.assign(n, GREEDY_TOKENS).set.name == set_name
        fs = engine.table.get(set_name)
        ref = reference.prompt_logprobs(ids, fs.factors, fs.n_hat, fs.resolved_mscale)
        got = prompt_logprob_list(out, ids)
        print(
            f"{name} {set_name}: max |Δ prompt logprob| = {max(abs(a - b) for a, b in zip(got, ref, strict=True)):.2e}"
        )
        assert max_logprob_error(got, ref) <= 1
        want = reference.greedy(ids, GREEDY_TOKENS, fs.factors, fs.n_hat, fs.resolved_mscale)
        assert list(out.outputs[0].token_ids) == want, f"{name} {set_name}: greedy tokens differ"


def test_sets_differ_on_this_family(family, loop) -> None:
    """The comparison can fail: the same prompt under two sets gives different prompt logprobs."""
    name, engine, _ = family
    ids = ids_of(300, 31)
    mid = loop.run(collect(engine, ids, f"{name}-mid", 1))
    nhat = loop.run(collect(engine, ids, f"{name}-nhat", 1, policy="reserve", requested_max_tokens=1500))
    assert engine.assign(300, 1500, "reserve").set.name == "nhat"
    diff = max(abs(a - b) for a, b in zip(prompt_logprob_list(mid, ids), prompt_logprob_list(nhat, ids), strict=True))
    assert diff > 1e-2, diff
