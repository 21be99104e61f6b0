"""The identity set equals stock vLLM; a Phi-3-style longrope model serves its own short and long sets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_harness import ENGINE_KWARGS, collect, ids_of, max_logprob_error, prompt_logprob_list

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def stock_outputs(loop, tiny_llama: Path) -> Iterator[list]:
    """Unpatched vLLM (no longrope config: the plugin stays inert) on the same model."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    async def run():
        stock = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(tiny_llama), **ENGINE_KWARGS))
        try:
            return [await collect(stock, ids_of(n, 50 + n), f"stock-{n}", 16) for n in (20, 120, 230)]
        finally:
            stock.shutdown()

    yield loop.run(run())


def test_identity_set_equals_stock_vllm(engine, loop, stock_outputs) -> None:
    for n, stock in zip((20, 120, 230), stock_outputs, strict=True):
        ids = ids_of(n, 50 + n)
        ours = loop.run(collect(engine, ids, f"identity-{n}", 16))
        assert engine.assign(n, 16).set.name == "original"
        assert list(ours.outputs[0].token_ids) == list(stock.outputs[0].token_ids)
        got, ref = prompt_logprob_list(ours, ids), prompt_logprob_list(stock, ids)
        diff = max(abs(a - b) for a, b in zip(got, ref, strict=True))
        print(f"identity vs stock, {n} tokens: max |Δ prompt logprob| = {diff:.2e}")
        assert max_logprob_error(got, ref) <= 1


def test_phi3_longrope_config_short_and_long(loop, phi3_engine, hf_phi3) -> None:
    """Sets come from the model's own longrope config; each equals HF transformers' Phi-3 forward,
    which uses the short factors up to the original length and the long factors beyond."""
    assert [fs.label for fs in phi3_engine.table.sets] == ["short@1", "long@1"]
    for n, expected in ((100, "short"), (500, "long")):
        ids = ids_of(n, n)
        out = loop.run(collect(phi3_engine, ids, f"phi3-{n}", 8))
        assert phi3_engine.assign(n, 8).set.name == expected
        with torch.no_grad():
            logp = torch.log_softmax(hf_phi3(torch.tensor([ids])).logits[0].double(), -1)
            ref = [logp[i - 1, ids[i]].item() for i in range(1, n)]
            gen = hf_phi3.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, n:].tolist()
        got = prompt_logprob_list(out, ids)
        diff = max(abs(a - b) for a, b in zip(got, ref, strict=True))
        print(f"phi3 {expected}: max |Δ prompt logprob| vs HF = {diff:.2e}")
        assert max_logprob_error(got, ref) <= 1
        assert list(out.outputs[0].token_ids) == gen
