"""Preemption under KV pressure: vLLM preempts running requests of different sets and resumes them by
recomputation; every request must come back on its own set (vllm#27414: switching sets mid-sequence under
concurrency corrupted outputs). A KV cache of 65 blocks of 32 tokens makes vLLM preempt when 25 requests
run at once; each request's tokens are compared with the same request run alone afterwards on the same
engine, where it fits (no preemption)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_harness import ENGINE_KWARGS, ids_of

pytestmark = pytest.mark.engine

BLOCKS = 65  # the fewest that hold one 2,048-token sequence (the largest window) plus the null block
BLOCK_SIZE = 32
ORIGINAL = 256  # the tiny Llama's original window (the "original" set); "mid" holds 1024


def _preemptions() -> float:
    """vLLM's own counter (the engine built last owns the process's ``vllm:`` Prometheus collectors)."""
    from prometheus_client import REGISTRY

    return sum(s.value for m in REGISTRY.collect() for s in m.samples if s.name == "vllm:num_preemptions_total")


@pytest.fixture(scope="module")
def tight(loop, tiny_llama: Path, set_files: Path) -> Iterator[object]:
    """The tiny model and its three sets with a KV cache of 65 × 32 tokens (one 2,048-token sequence) (built after any earlier
    engine of the session, so it owns the ``vllm:`` collectors read by _preemptions)."""
    from server.engine import EngineSettings, LongRopeEngine

    kwargs = {**ENGINE_KWARGS, "max_num_seqs": 32, "block_size": BLOCK_SIZE, "num_gpu_blocks_override": BLOCKS}
    settings = EngineSettings(model=str(tiny_llama), factor_paths=[str(set_files)], engine_kwargs=kwargs)
    eng = loop.run(LongRopeEngine.start(settings))
    yield eng
    eng.shutdown()


def _params(max_tokens: int, policy: str | None = None):
    from vllm import SamplingParams

    extra = {"longrope_policy": policy} if policy else None
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)


async def _tokens(engine, ids: list[int], request_id: str, max_tokens: int, policy: str | None = None) -> list[int]:
    final = None
    async for out in engine.generate({"prompt_token_ids": ids}, _params(max_tokens, policy), request_id):
        final = out
    return list(final.outputs[0].token_ids)


def _jobs() -> list[tuple[str, list[int], int, str | None]]:
    """vllm#27414's shape scaled to the tiny model: 16 prompts just under the short window whose generation
    crosses it (upgrade original → mid), with requests that stay on original, start on mid, or reserve nhat."""
    jobs = [(f"cross-{i}", ids_of(ORIGINAL - 20 - i, 500 + i), 90, None) for i in range(16)]
    jobs += [(f"short-{i}", ids_of(60 + 10 * i, 600 + i), 24, None) for i in range(4)]
    jobs += [(f"mid-{i}", ids_of(400 + 50 * i, 700 + i), 60, None) for i in range(3)]
    jobs += [(f"nhat-{i}", ids_of(150 + 10 * i, 800 + i), 30, "reserve-nhat") for i in range(2)]
    return jobs


def test_preempted_requests_finish_with_unpreempted_tokens(loop, tight) -> None:
    jobs = _jobs()

    async def run(eng, concurrent: bool, tag: str) -> dict[str, list[int]]:
        async def one(name, ids, n, kind):
            if kind == "reserve-nhat":  # reserve with a budget beyond mid's window: starts and stays on nhat
                final = None
                async for out in eng.generate(
                    {"prompt_token_ids": ids}, _params(n, "reserve"), f"{tag}-{name}", requested_max_tokens=1500
                ):
                    final = out
                return list(final.outputs[0].token_ids)
            return await _tokens(eng, ids, f"{tag}-{name}", n)

        if concurrent:
            results = await asyncio.gather(*(one(*job) for job in jobs))
        else:
            results = [await one(*job) for job in jobs]
        return {job[0]: r for job, r in zip(jobs, results, strict=True)}

    before = _preemptions()
    squeezed = loop.run(run(tight, concurrent=True, tag="tight"))  # first: a cold prefix cache
    preempted = _preemptions() - before
    alone = loop.run(run(tight, concurrent=False, tag="alone"))
    print(f"preemptions under a {BLOCKS}×{BLOCK_SIZE} KV cache: {preempted:.0f}")
    assert preempted >= 3, "the KV cache was not tight enough to preempt: this test would prove nothing"
    assert _preemptions() - before == preempted, "a request run alone was preempted"
    differing = [name for name in alone if squeezed[name] != alone[name]]
    assert not differing, f"preempted requests changed their tokens: {differing}"
    # every crossing request moved exactly once, original → mid, and ended there
    for name, *_ in jobs:
        moves = [r for r in tight.upgrade_log if r.request_id == f"tight-{name}"]
        if name.startswith("cross-"):
            assert [(m.from_key, m.to_key) for m in moves] == [("original@1", "mid@1")], name
        else:
            assert moves == [], name
    assert tight.in_flight == {} or all(v == 0 for v in tight.in_flight.values())
