"""Upgrade by recompute: a request whose generation outgrows its set moves to the larger set, as Hugging Face
transformers' Phi-3 means to do for one sequence: drop the cache and re-run everything under the long factors
the first time the sequence grows past ``original_max_position_embeddings``.

The reference is HF's own Phi-3 forward over the whole sequence at every step (no cache), where HF picks the
short factors while the sequence is ≤ the original window and the long ones beyond — what the cache-dropping
recompute is meant to equal. HF's ``generate`` itself (transformers 5.19) does not do it: after dropping the
cache it still slices the input to the last token, so at the crossing the model sees one token and no cache,
and because the new cache then holds 1 token the drop repeats at every later step (seen with a forward hook:
input length 1, no cache, from position 128 on). Its tokens are compared up to the crossing only."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_harness import ids_of, max_logprob_error, prompt_logprob_list

pytestmark = pytest.mark.engine

SHORT_WINDOW = 128  # the tiny Phi-3's original_max_position_embeddings


def _params(max_tokens: int, policy: str | None = None, prompt_logprobs: bool = False):
    from vllm import SamplingParams

    extra = {"longrope_policy": policy} if policy else None
    return SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        ignore_eos=True,
        prompt_logprobs=0 if prompt_logprobs else None,
        extra_args=extra,
    )


async def _run(engine, ids: list[int], request_id: str, params) -> list:
    return [out async for out in engine.generate({"prompt_token_ids": ids}, params, request_id)]


def _hf_greedy(hf, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from HF's Phi-3 run over the whole sequence at every step."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def _hf_generate(hf, ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids) :].tolist()


def _records(engine, request_id: str) -> list:
    return [r for r in engine.upgrade_log if r.request_id == request_id]


def test_crossing_request_equals_hf_generate(loop, phi3_engine, hf_phi3) -> None:
    ids, new = ids_of(100, seed=301), 60  # crosses the short window at its 29th token
    outs = loop.run(_run(phi3_engine, ids, "cross-1", _params(new)))
    final = outs[-1]
    tokens = list(final.outputs[0].token_ids)
    assert final.finished and final.outputs[0].finish_reason == "length"
    assert [o.finished for o in outs].count(True) == 1, "an intermediate phase was reported as finished"
    assert final.request_id == "cross-1" and list(final.prompt_token_ids) == ids
    assert tokens == _hf_greedy(hf_phi3, ids, new)
    in_short = SHORT_WINDOW - len(ids) + 1  # tokens sampled from positions < the window (short factors)
    assert tokens[:in_short] == _hf_generate(hf_phi3, ids, in_short)
    (record,) = _records(phi3_engine, "cross-1")
    assert (record.from_key, record.to_key) == ("short@1", "long@1")
    assert record.recompute_tokens == SHORT_WINDOW + 1  # HF re-runs at the first token past the window
    assert record.cached_tokens == 0, "the recompute reused a block computed under the short set"
    assert record.seconds is not None and record.seconds > 0

    # The same prompt admitted on the long set from the start (reserve) gives other tokens: the test can
    # tell which set generated what.
    reserved = loop.run(_run(phi3_engine, ids, "cross-reserve", _params(new, "reserve")))[-1]
    assert list(reserved.outputs[0].token_ids) != tokens
    # pin: never moves, stops at the window with finish_reason "length"; until then the tokens are HF's.
    pinned = loop.run(_run(phi3_engine, ids, "cross-pin", _params(new, "pin")))[-1]
    assert pinned.outputs[0].finish_reason == "length"
    assert list(pinned.outputs[0].token_ids) == tokens[: SHORT_WINDOW - len(ids)]
    assert not _records(phi3_engine, "cross-pin") and not _records(phi3_engine, "cross-reserve")


def test_upgraded_request_hits_cache_only_under_its_new_set(loop, phi3_engine) -> None:
    """By construction the new set's salt makes the short-set blocks invisible; a second identical request
    shows the cache itself works (its recompute hits the blocks the first one computed under the long set)."""
    ids = ids_of(100, seed=302)
    loop.run(_run(phi3_engine, ids, "salt-1", _params(40)))
    loop.run(_run(phi3_engine, ids, "salt-2", _params(40)))
    (first,) = _records(phi3_engine, "salt-1")
    (second,) = _records(phi3_engine, "salt-2")
    assert first.cached_tokens == 0
    assert second.cached_tokens >= SHORT_WINDOW  # one full 128-token block, computed under long@1


def test_mixed_batch_with_crossing_requests_equals_hf(loop, phi3_engine, hf_phi3) -> None:
    cases = {  # request id: (prompt, new tokens)
        "mix-cross-a": (ids_of(100, seed=303), 50),
        "mix-cross-b": (ids_of(120, seed=304), 30),
        "mix-short": (ids_of(50, seed=305), 20),
        "mix-long": (ids_of(400, seed=306), 20),
    }

    async def together():
        return await asyncio.gather(*(_run(phi3_engine, ids, rid, _params(n)) for rid, (ids, n) in cases.items()))

    results = dict(zip(cases, loop.run(together()), strict=True))
    for rid, (ids, n) in cases.items():
        final = results[rid][-1]
        assert list(final.outputs[0].token_ids) == _hf_greedy(hf_phi3, ids, n), f"{rid} differs from HF"
    assert len(_records(phi3_engine, "mix-cross-a")) == len(_records(phi3_engine, "mix-cross-b")) == 1
    assert not _records(phi3_engine, "mix-short") and not _records(phi3_engine, "mix-long")


def test_prompt_logprobs_of_non_crossing_requests_equal_hf(loop, phi3_engine, hf_phi3) -> None:
    ids = ids_of(90, seed=307)
    final = loop.run(_run(phi3_engine, ids, "plp", _params(8, prompt_logprobs=True)))[-1]
    with torch.no_grad():
        logp = torch.log_softmax(hf_phi3(torch.tensor([ids])).logits[0].double(), -1)
    ref = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert max_logprob_error(prompt_logprob_list(final, ids), ref) <= 1


def test_streamed_phases_join_into_one_request(loop, phi3_engine) -> None:
    """DELTA outputs (what streaming uses): the phases' deltas add up to the non-streamed tokens, only the
    last output is finished, and prompt logprobs come once, from the first phase."""
    from vllm.sampling_params import RequestOutputKind

    ids = ids_of(110, seed=308)
    whole = loop.run(_run(phi3_engine, ids, "delta-ref", _params(40)))[-1]
    params = _params(40, prompt_logprobs=True)
    params.output_kind = RequestOutputKind.DELTA
    outs = loop.run(_run(phi3_engine, ids, "delta", params))
    streamed = [t for o in outs for t in o.outputs[0].token_ids]
    assert streamed == list(whole.outputs[0].token_ids)
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert [len(o.prompt_logprobs or []) for o in outs if o.prompt_logprobs] == [len(ids)]
    assert "".join(o.outputs[0].text for o in outs) == whole.outputs[0].text
