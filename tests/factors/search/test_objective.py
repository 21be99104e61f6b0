"""Needle-driven perplexity (LongRoPE2) and the ppl objective over several kinds of text, on the tiny fixture:
the documents are deterministic task prompts of the target length from every text kind, the score is the NLL
of the answer tokens alone (checked against a full forward), and a search minimises it and records it."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from factors.baselines import make_baseline
from factors.schema import FactorSetError
from factors.search.evolution import SearchConfig, SearchPlan
from factors.search.objective import NeedleObjective, make_fitness, ppl_fitness, text_specs

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "factors" / "data" / "tiny-short" / "model"
KINDS = ("stdlib:search", "stdlib:heldout")
LENGTH = 256


@pytest.fixture(scope="module")
def ev():
    from factors.evaluation.evaluator import Evaluator

    torch.manual_seed(0)
    return Evaluator(MODEL, threads=1)


@pytest.fixture(scope="module")
def needle(ev) -> NeedleObjective:
    return NeedleObjective(ev, LENGTH, KINDS, tasks=("niah_single", "vt"), depths=3, samples=1, seed=5)


def test_documents_are_task_prompts_of_the_target_length_from_every_kind(ev, needle: NeedleObjective) -> None:
    docs = needle.docs
    assert len(docs) == 2 * 2 * 3  # kinds × tasks × depths × samples
    assert needle.describe()["kinds"] == list(KINDS) and needle.describe()["depths"] == [0.0, 0.5, 1.0]
    for d in docs:
        text = ev.detokenize(d.ids.tolist())
        prompt, answer = text[: d.answer_start], text[d.answer_start :]
        assert d.ids.numel() <= LENGTH and d.ids.numel() >= LENGTH - 30  # as long as the answer lets it be
        assert answer.endswith(">") and prompt.count("<") >= 1 and "\n?" in prompt[-20:]
        if d.task == "niah_single":
            key = prompt[prompt.rindex("?") + 1 : -1]
            assert f"<{key}={answer}" in prompt and d.answer_len == 6  # VALUE> after the asked key's needle
    again = NeedleObjective(ev, LENGTH, KINDS, tasks=("niah_single", "vt"), depths=3, samples=1, seed=5)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(docs, again.docs, strict=True))  # deterministic
    other = NeedleObjective(ev, LENGTH, KINDS, tasks=("niah_single", "vt"), depths=3, samples=1, seed=6)
    assert not all(torch.equal(a.ids, b.ids) for a, b in zip(docs, other.docs, strict=True))


def test_score_is_the_nll_of_the_answer_tokens_only(ev, needle: NeedleObjective) -> None:
    yarn = make_baseline("yarn", ev.rope.geometry, LENGTH)
    total, count, per_doc = needle.nll(yarn)
    assert count == sum(d.answer_len for d in needle.docs)
    assert needle(yarn) == pytest.approx(math.exp(total / count))
    ref_total = 0.0
    for d, mine in zip(needle.docs, per_doc, strict=True):
        logits = ev.logits(d.ids.unsqueeze(0), yarn)[0]
        a = d.answer_start
        ref = float(torch.nn.functional.cross_entropy(logits[a - 1 : -1], d.ids[a:], reduction="sum"))
        assert mine * d.answer_len == pytest.approx(ref, rel=1e-4, abs=1e-4)
        ref_total += ref
    assert total == pytest.approx(ref_total, rel=1e-5)
    # the haystack's own tokens are not scored: plain perplexity of the same documents is another number
    ppl = ev.perplexity(yarn, torch.stack([d.ids for d in needle.docs if d.ids.numel() == LENGTH]))
    assert abs(math.log(ppl) - total / count) > 0.1


def test_ppl_objective_draws_windows_from_every_kind(ev) -> None:
    tokens = [ev.tokenize("a" * 3000), ev.tokenize("b" * 3000)]
    seen = []

    class Spy:  # the evaluator's perplexity, recording the windows it is given
        def __getattr__(self, name):  # noqa: ANN001, ANN204
            return getattr(ev, name)

        def perplexity(self, fs, windows):  # noqa: ANN001, ANN202
            seen.append(windows)
            return ev.perplexity(fs, windows)

    fit = ppl_fitness(Spy(), tokens, 128, 2, seed=0)
    value = fit(make_baseline("identity", ev.rope.geometry, 128))
    assert value > 0 and seen[0].shape == (4, 128)
    assert {int(w[0]) for w in seen[0]} == {ord("a"), ord("b")}


def test_make_fitness_picks_the_objective(ev) -> None:
    plan = SearchPlan(long=SearchConfig(target_len=LENGTH), text="stdlib:search, stdlib:heldout", samples=1)
    assert text_specs(plan.text) == KINDS
    tokens = [ev.tokenize("x" * 1000)]
    _, info = make_fitness(ev, plan, tokens, LENGTH, 1, "ppl")
    assert info == {"objective": "ppl"}
    plan = replace(plan, needle_tasks=("niah_single",), needle_depths=2)
    fit, info = make_fitness(ev, plan, tokens, LENGTH, 1, "needle-ppl")
    assert info["objective"] == "needle-ppl" and info["needle"]["documents"] == 2 * 2
    assert info["needle"]["answer_tokens"] == 4 * 6
    with pytest.raises(FactorSetError, match="unknown objective"):
        make_fitness(ev, plan, tokens, LENGTH, 1, "bleu")
    with pytest.raises(ValueError, match="unknown objective"):
        SearchPlan(long=SearchConfig(target_len=LENGTH), objective="bleu")
    with pytest.raises(FactorSetError, match="too short"):
        NeedleObjective(ev, 12, KINDS[:1], tasks=("vt",), depths=1)


def test_search_minimises_needle_ppl_and_records_it(ev) -> None:
    from factors.search.progressive import search_set, texts_tokens

    config = SearchConfig(
        target_len=LENGTH, population=3, parents=2, mutations=1, crossovers=1, generations=1, critical_pair=13
    )
    plan = SearchPlan(
        long=config,
        text=",".join(KINDS),
        samples=1,
        progress=False,
        objective="needle-ppl",
        needle_tasks=("niah_single",),
        needle_depths=2,
    )
    fs, _ = search_set(ev, texts_tokens(ev, plan.text), plan, plan.long, name="needle")
    m = fs.provenance.metrics
    assert m["objective"] == "needle-ppl" and m["data"] == "stdlib:search,stdlib:heldout"
    assert m["needle"]["documents"] == 4 and m["critical_pair"] == 13
    assert set(m["seed_ppl"]) == {"pi", "ntk", "yarn"}
    assert m["ppl"] <= min(m["seed_ppl"].values())
    needle = NeedleObjective(ev, LENGTH, KINDS, tasks=("niah_single",), depths=2, seed=0)
    assert needle(fs) == pytest.approx(m["ppl"], rel=1e-6)  # the recorded score is the needle-ppl of the set
    assert min(fs.factors[13:]) >= LENGTH / 128
