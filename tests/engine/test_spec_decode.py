"""ngram speculative decoding (prompt lookup) with per-request sets, on one engine that also runs chunked
prefill, prefix caching, a tight KV cache (preemption), n > 1, logprobs and structured outputs.

Every drafted token is verified in the target's own forward pass, whose layout ``_prepare_inputs`` builds, so
the per-step fill gives drafts their request's set. The model is the shipped fine-tuned tiny model (a trained
byte-level Llama: its greedy text depends on the angles, and it repeats spans of its prompt, so lookup drafts
get accepted; random tiny models only echo their last token). Outputs are checked token for token against
greedy decoding *without* speculation by an independent reference (HF transformers' forward with a
plain-torch float64 LongRoPE rotary) and, through the logprob of every generated token, against that
reference's logits under the request's own set. Each test asserts that drafts were accepted (vLLM's
per-request ``spec_decode_metrics``), so it cannot pass with speculation idle."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_harness import ENGINE_KWARGS, TorchReference, prompt_logprob_list

pytestmark = pytest.mark.engine

FOLDER = Path(__file__).resolve().parents[2] / "factors" / "data" / "tiny-finetuned" / "model"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
BLOCKS, BLOCK_SIZE = 33, 32  # one 1,024-token sequence: concurrent requests get preempted
STEP_TOKENS = 256  # max_num_batched_tokens: longer prompts are prefilled in chunks
SHORT = 128  # the "longrope-short" set's window; "mid-512" holds 512, "longrope-1024" 1,024
# the fine-tuned model's logprobs are O(1); vLLM's fp32 forward and HF's differ by ≤ 2e-6 here (measured)
LOGPROB_TOL = 5e-5


@pytest.fixture(scope="module")
def set_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model's 128 and 1,024 sets plus a 512-window one (the 8,192 set's factors): three distinct tiers."""
    from factors.formats import load_json_set, save_json_set

    folder = tmp_path_factory.mktemp("spec-sets")
    sets = FOLDER / "longrope-sets"
    for name in ("longrope-short", "longrope-1024"):
        save_json_set(load_json_set(sets / f"{name}.json"), folder / f"{name}.json")
    mid = load_json_set(sets / "longrope-8192.json").with_updates(name="mid-512", max_len=512, version=None)
    save_json_set(mid, folder / "mid-512.json")
    return folder


@pytest.fixture(scope="module")
def spec_engine(loop, set_dir: Path) -> Iterator[Any]:
    from server.engine import EngineSettings, LongRopeEngine

    kwargs = {
        **ENGINE_KWARGS,
        "max_num_seqs": 32,
        "block_size": BLOCK_SIZE,
        "num_gpu_blocks_override": BLOCKS,
        "max_num_batched_tokens": STEP_TOKENS,
        "enable_chunked_prefill": True,
        "speculative_config": dict(SPEC),
    }
    settings = EngineSettings(model=str(FOLDER), factor_paths=[str(set_dir)], default_reserve=16, engine_kwargs=kwargs)
    eng = loop.run(LongRopeEngine.start(settings))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference() -> TorchReference:
    return TorchReference(str(FOLDER))


@pytest.fixture(scope="module")
def text() -> bytes:
    from factors.evaluation.corpus import stdlib_text

    return stdlib_text("heldout", 40_000).encode("ascii", errors="ignore")


def document(text: bytes, n: int, seed: int) -> list[int]:
    """n byte tokens: a passage of held-out text whose last 40 bytes restart it, so its continuation repeats
    spans of the prompt (what prompt lookup drafts from)."""
    doc = text[(seed * 997) % 30_000 :][: n - 40]
    return list(doc + doc[:40])


def cached_greedy(reference: TorchReference, ids: list[int], n: int, fs: Any) -> list[int]:
    """Greedy decoding without speculation: HF's forward with the reference's exact rotary, KV-cached."""
    import torch

    reference._use(fs.factors, fs.n_hat, fs.resolved_mscale)
    out: list[int] = []
    with torch.no_grad():
        step = reference.model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            step = reference.model(torch.tensor([[out[-1]]]), past_key_values=step.past_key_values, use_cache=True)
    return out


def params(max_tokens: int, **kw: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True, "logprobs": 0, **kw})


async def run(engine: Any, ids: list[int], request_id: str, sampling: Any, **kw: Any) -> Any:
    final = None
    async for out in engine.generate({"prompt_token_ids": ids}, sampling, request_id, **kw):
        final = out
    return final


def accepted(completion: Any) -> int:
    stats = completion.spec_decode_metrics
    return 0 if stats is None else sum(j * count for j, count in enumerate(stats.histogram))


def sampled_logprobs(completion: Any) -> list[float]:
    return [step[tok].logprob for tok, step in zip(completion.token_ids, completion.logprobs, strict=True)]


def check_against_reference(engine: Any, reference: TorchReference, ids: list[int], completion: Any, set_name: str):
    """Tokens = greedy without speculation; every generated token's logprob = the reference's under the set."""
    fs = engine.table.get(set_name)
    tokens = list(completion.token_ids)
    want = cached_greedy(reference, ids, len(tokens), fs)
    assert tokens == want, f"{set_name}: speculative greedy output differs from greedy without speculation"
    ref = reference.prompt_logprobs(ids + tokens, fs.factors, fs.n_hat, fs.resolved_mscale)[len(ids) - 1 :]
    assert logprob_gap(sampled_logprobs(completion), ref) <= LOGPROB_TOL, f"{set_name}: generated logprobs differ"


def logprob_gap(got: list[float], ref: list[float]) -> float:
    gap = max(abs(a - b) for a, b in zip(got, ref, strict=True))
    print(f"max |Δ logprob| = {gap:.2e} over {len(got)} tokens")
    return gap


def metric(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return sum(
        s.value
        for m in REGISTRY.collect()
        for s in m.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


CASES = [(80, "longrope-short"), (400, "mid-512"), (900, "longrope-1024")]  # prompt + 40 stays in the window


def test_three_sets_in_one_batch_equal_greedy_without_speculation(spec_engine, loop, reference, text) -> None:
    before = {name: metric("longrope_spec_decode_accepted_tokens_total", factor_set=name) for _, name in CASES}
    jobs = [(document(text, n, seed=n), name) for n, name in CASES]

    async def batch():
        return await asyncio.gather(*(run(spec_engine, ids, f"sd-{i}", params(40)) for i, (ids, _) in enumerate(jobs)))

    outs = loop.run(batch())
    for out, (ids, name) in zip(outs, jobs, strict=True):
        c = out.outputs[0]
        assert spec_engine.assign(len(ids), 40).set.name == name
        assert accepted(c) > 0, f"{name}: no draft accepted, speculation did not run"
        check_against_reference(spec_engine, reference, ids, c, name)
        gained = metric("longrope_spec_decode_accepted_tokens_total", factor_set=name) - before[name]
        assert gained >= accepted(c), f"{name}: per-set acceptance counter not updated"
    assert metric("vllm:spec_decode_num_accepted_tokens_total") > 0  # vLLM's own counter, on /metrics


def test_the_check_tells_sets_apart(spec_engine, loop, reference, text) -> None:
    """The reference comparison can fail: the same output scored under another set is far off."""
    ids = document(text, 400, seed=400)
    c = loop.run(run(spec_engine, ids, "sd-other", params(40))).outputs[0]
    fs = spec_engine.table.get("longrope-1024")
    ref = reference.prompt_logprobs(ids + list(c.token_ids), fs.factors, fs.n_hat, fs.resolved_mscale)
    assert logprob_gap(sampled_logprobs(c), ref[len(ids) - 1 :]) > 100 * LOGPROB_TOL


def crossing_reference(engine: Any, reference: TorchReference, ids: list[int], n: int) -> list[int]:
    """Greedy without speculation for a request that starts on the 128 set and moves to mid-512: it generates
    on the 128 set until it is 129 tokens long (the last token comes from the logits at position 127, see
    :func:`server.policy.phase_limit`), then all 129 are recomputed under mid-512."""
    head = cached_greedy(reference, ids, SHORT + 1 - len(ids), engine.table.get("longrope-short"))
    return head + cached_greedy(reference, ids + head, n - len(head), engine.table.get("mid-512"))


def test_request_outgrowing_its_window_upgrades_where_it_would_without(spec_engine, loop, reference, text) -> None:
    jobs = [(document(text, SHORT - 24 - 3 * i, seed=50 + i), f"sd-cross-{i}") for i in range(3)]
    before = metric("longrope_spec_decode_accepted_tokens_total", factor_set="longrope-short")

    async def batch():
        return await asyncio.gather(*(run(spec_engine, ids, rid, params(60)) for ids, rid in jobs))

    outs = loop.run(batch())
    assert metric("longrope_spec_decode_accepted_tokens_total", factor_set="longrope-short") > before
    for out, (ids, rid) in zip(outs, jobs, strict=True):
        assert list(out.outputs[0].token_ids) == crossing_reference(spec_engine, reference, ids, 60), rid
        moves = [(r.from_key, r.to_key, r.recompute_tokens) for r in spec_engine.upgrade_log if r.request_id == rid]
        assert moves == [("longrope-short@1", "mid-512@1", SHORT + 1)], f"{rid}: moved {moves}"


def test_preempted_requests_equal_greedy_without_speculation(spec_engine, loop, reference, text) -> None:
    jobs = [(f"cross-{i}", document(text, SHORT - 20 - i, 500 + i), 60) for i in range(12)]
    jobs += [(f"short-{i}", document(text, 50 + 10 * i, 600 + i), 24) for i in range(3)]
    jobs += [(f"mid-{i}", document(text, 300 + 50 * i, 700 + i), 40) for i in range(2)]
    preempted_before = metric("vllm:num_preemptions_total")

    async def squeeze():
        return await asyncio.gather(*(run(spec_engine, ids, f"sq-{name}", params(n)) for name, ids, n in jobs))

    outs = loop.run(squeeze())
    preempted = metric("vllm:num_preemptions_total") - preempted_before
    print(f"preemptions under speculation: {preempted:.0f}")
    assert preempted >= 3, "the KV cache was not tight enough to preempt: this test would prove nothing"
    assert sum(accepted(o.outputs[0]) for o in outs) > 0
    for out, (name, ids, n) in zip(outs, jobs, strict=True):
        if name.startswith("cross-"):
            want = crossing_reference(spec_engine, reference, ids, n)
        else:
            want = cached_greedy(
                reference, ids, n, spec_engine.table.get("longrope-short" if name[0] == "s" else "mid-512")
            )
        assert list(out.outputs[0].token_ids) == want, f"{name}: preempted request under speculation changed its tokens"
    # drafts that would have run past a window were cut (crossing requests draft up to their window)
    (status,) = loop.run(spec_engine.worker_status())
    assert status["drafts_trimmed"] > 0


# -- vLLM features on the same engine (docs/engine.md's feature matrix)


def test_chunked_prefill_prefix_cache_and_prompt_logprobs(spec_engine, loop, reference, text) -> None:
    ids = document(text, 900, seed=31)  # > STEP_TOKENS: prefilled in chunks
    fs = spec_engine.table.get("longrope-1024")
    ref = reference.prompt_logprobs(ids, fs.factors, fs.n_hat, fs.resolved_mscale)
    with_prompt_logprobs = loop.run(run(spec_engine, ids, "sd-pl", params(16, prompt_logprobs=0)))
    assert logprob_gap(prompt_logprob_list(with_prompt_logprobs, ids), ref) <= LOGPROB_TOL
    # vLLM reads no cached blocks for a request that wants prompt logprobs; two without them:
    first = loop.run(run(spec_engine, ids, "sd-pc-1", params(16)))
    again = loop.run(run(spec_engine, ids, "sd-pc-2", params(16)))
    assert again.num_cached_tokens >= 800, "the prefix cache was not used"
    for out in (with_prompt_logprobs, first, again):
        check_against_reference(spec_engine, reference, ids, out.outputs[0], "longrope-1024")
        assert accepted(out.outputs[0]) > 0


def test_n_above_one_and_top_logprobs(spec_engine, loop, reference, text) -> None:
    """n = 2 (random sampling, which vLLM requires for n > 1; speculation then uses rejection sampling): every
    sampled token's raw logprob is the reference model's under the request's set."""
    from vllm.sampling_params import RequestOutputKind

    ids = document(text, 400, seed=41)
    final_only = RequestOutputKind.FINAL_ONLY  # as vLLM's serving layer asks for a non-streamed request
    out = loop.run(run(spec_engine, ids, "sd-n2", params(24, n=2, logprobs=3, temperature=0.7, output_kind=final_only)))
    assert len(out.outputs) == 2
    fs = spec_engine.table.get("mid-512")
    for c in out.outputs:
        ref = reference.prompt_logprobs(ids + list(c.token_ids), fs.factors, fs.n_hat, fs.resolved_mscale)
        assert logprob_gap(sampled_logprobs(c), ref[len(ids) - 1 :]) <= LOGPROB_TOL
        assert all(len(step) >= 3 for step in c.logprobs)  # top-3 (+ the sampled token)


LOWER = bytes(range(ord("a"), ord("z") + 1)) + b" "
WHITESPACE = b" \n\t"


def regex_allowed(prefix: bytes) -> bytes:
    """What ``[a-z ]{4,200}`` allows next (it cannot end within the test's 24 tokens)."""
    return LOWER


def json_allowed(prefix: bytes) -> bytes:
    """What JSON for ``{"text": "<[a-z ]{40,80}>"}`` allows after ``prefix`` (whitespace between tokens)."""
    if not prefix:
        return b"{"
    rest = prefix[1:].lstrip(WHITESPACE)
    if not rest:
        return WHITESPACE + b'"'
    key = b'"text"'
    if len(rest) < len(key):
        return key[len(rest) : len(rest) + 1]
    rest = rest[len(key) :].lstrip(WHITESPACE)
    if not rest:
        return WHITESPACE + b":"
    rest = rest[1:].lstrip(WHITESPACE)
    return WHITESPACE + b'"' if not rest else LOWER


def constrained_greedy(reference: TorchReference, ids: list[int], n: int, fs: Any, allowed_after: Any):
    """Greedy decoding under a grammar (``allowed_after(prefix)`` → the bytes it allows next): the tokens, and
    each token's logprob over the allowed tokens (vLLM applies the grammar's mask to the logits before it
    computes logprobs)."""
    import torch

    reference._use(fs.factors, fs.n_hat, fs.resolved_mscale)
    tokens: list[int] = []
    logprobs: list[float] = []
    with torch.no_grad():
        step = reference.model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            options = torch.tensor(list(allowed_after(bytes(tokens))))
            masked = torch.log_softmax(step.logits[0, -1].double()[options], dim=-1)
            best = int(masked.argmax())
            tokens.append(int(options[best]))
            logprobs.append(float(masked[best]))
            step = reference.model(torch.tensor([[tokens[-1]]]), past_key_values=step.past_key_values, use_cache=True)
    return tokens, logprobs


def test_structured_outputs_keep_the_set(spec_engine, loop, reference, text) -> None:
    """Grammar-constrained output (regex, JSON schema) equals the reference's greedy decoding under the same
    constraint, token for token and logprob for logprob, under the request's set. The byte model has no EOS
    token, so the grammars cannot end within max_tokens (else nothing would be allowed)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    schema = {
        "type": "object",
        "properties": {"text": {"type": "string", "pattern": "^[a-z ]{40,80}$"}},
        "required": ["text"],
    }
    cases = [
        (StructuredOutputsParams(regex="[a-z ]{4,200}"), regex_allowed),
        (StructuredOutputsParams(json=schema), json_allowed),
    ]
    fs = spec_engine.table.get("mid-512")
    for i, (structured, allowed_after) in enumerate(cases):
        ids = document(text, 300, seed=60 + i)
        sampling = SamplingParams(temperature=0.0, max_tokens=24, logprobs=0, structured_outputs=structured)
        c = loop.run(run(spec_engine, ids, f"sd-so-{i}", sampling)).outputs[0]
        want, want_logprobs = constrained_greedy(reference, ids, 24, fs, allowed_after)
        assert bytes(c.token_ids) == bytes(want), f"{structured}: {bytes(c.token_ids)!r} != {bytes(want)!r}"
        assert logprob_gap(sampled_logprobs(c), want_logprobs) <= LOGPROB_TOL


def test_seeded_request_is_refused_and_engine_keeps_serving(spec_engine, loop, text) -> None:
    """vLLM 0.32's CPU runner dies on a seeded request whose prefill is split ("CPU Generator does not use
    offset"): refused per request with vLLM's 400 error instead."""
    from vllm.exceptions import VLLMValidationError

    ids = document(text, 400, seed=43)  # > STEP_TOKENS: its prefill would be split
    with pytest.raises(VLLMValidationError, match="per-request seed is refused on the CPU build"):
        loop.run(run(spec_engine, ids, "sd-seed", params(8, temperature=0.7, seed=5)))
    assert len(loop.run(run(spec_engine, ids, "sd-after-seed", params(8))).outputs[0].token_ids) == 8
