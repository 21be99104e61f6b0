"""What a search minimises: perplexity of text windows (LongRoPE), or needle-driven perplexity (LongRoPE2).

Plain perplexity averages over every token of a window, and nearly all of them are predictable from the few
hundred tokens before them: a set that blurs far positions loses little. LongRoPE2 (arXiv 2502.20082) scores
a candidate instead by the loss of the tokens that *can only* be predicted from far away. Here those are
the answers of task documents (``factors.evaluation.tasks``): a needle ``<KEY=VALUE>`` hidden at a depth
of a haystack of the target length, the query at the end, and the answer's tokens scored, nothing else. The
documents span several depths and tasks and are built from every kind of text the search draws from, the
same documents for every candidate (deterministic by seed), so scores compare.

Both objectives return a perplexity, exp(mean NLL per scored token), so the search and its records read
the same either way. More than one kind of text: ``text`` specs separated by commas
(``stdlib:search,english:search``); the ppl objective takes ``samples`` windows of each.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from factors.schema import FactorSet, FactorSetError

OBJECTIVES = ("ppl", "needle-ppl")
DEFAULT_NEEDLE_TASKS = ("niah_single", "niah_multikey")
Fitness = Callable[[FactorSet], float]


def text_specs(spec: str) -> tuple[str, ...]:
    """The text specs of a comma-separated list (each a file or stdlib:SPLIT; see factors.evaluation.corpus)."""
    specs = tuple(s.strip() for s in spec.split(",") if s.strip())
    if not specs:
        raise FactorSetError(f"no text named in {spec!r}; give a file or stdlib:SPLIT (several: comma-separated)")
    return specs


@functools.lru_cache(maxsize=16)
def haystack_text(spec: str) -> str:
    """A text kind cleaned for task documents, read as the RULER suite reads it (once per process)."""
    from factors.evaluation.ruler import load_haystack

    try:
        return load_haystack(spec)
    except ValueError as err:
        raise FactorSetError(str(err)) from None


def ppl_fitness(ev: Any, tokens: Sequence[torch.Tensor], length: int, samples: int, seed: int) -> Fitness:
    """Perplexity of ``samples`` seeded windows of ``length`` tokens from each text (same windows for every
    candidate): LongRoPE's objective."""
    windows = torch.cat([ev.windows(t, length, samples, seed + 7919 * k) for k, t in enumerate(tokens)])
    return lambda fs: ev.perplexity(fs, windows)


@dataclass(frozen=True)
class NeedleDoc:
    """One scored document: its token ids (prompt then answer), where the answer starts, and what it is."""

    ids: torch.Tensor
    answer_start: int
    task: str
    depth: float
    kind: str

    @property
    def answer_len(self) -> int:
        return self.ids.numel() - self.answer_start


class NeedleObjective:
    """Needle-driven perplexity of a model at one length: exp(mean NLL of the answer tokens) over task
    documents of every (text kind, task, depth, sample), built once and scored under each candidate set."""

    def __init__(
        self,
        ev: Any,
        length: int,
        kinds: Sequence[str],
        *,
        tasks: Sequence[str] = DEFAULT_NEEDLE_TASKS,
        depths: int | Sequence[float] = 5,
        samples: int = 1,
        seed: int = 0,
        template: str = "compact",
    ) -> None:
        self.ev, self.length = ev, length
        from factors.evaluation.tasks import depth_grid

        self.docs = build_docs(ev, length, kinds, tasks, depth_grid(depths), samples, seed, template)

    def nll(self, fs: FactorSet | None) -> tuple[float, int, list[float]]:
        """(summed answer-token NLL, scored tokens, per-document mean NLL) under a set."""
        rows = max(d.ids.numel() for d in self.docs)
        self.ev.use(fs, rows)
        per_doc = [0.0] * len(self.docs)
        by_len: dict[int, list[int]] = {}
        for i, d in enumerate(self.docs):
            by_len.setdefault(d.ids.numel(), []).append(i)
        total, count = 0.0, 0
        for n, idx in sorted(by_len.items()):
            step = max(1, 16384 // n)
            for a in range(0, len(idx), step):
                chunk = idx[a : a + step]
                for i, s in zip(chunk, self._score([self.docs[i] for i in chunk]), strict=True):
                    doc = self.docs[i]
                    per_doc[i] = s / doc.answer_len
                    total += s
                    count += doc.answer_len
        return total, count, per_doc

    @torch.no_grad()
    def _score(self, docs: list[NeedleDoc]) -> list[float]:
        ev = self.ev
        ids = torch.stack([d.ids for d in docs]).to(ev.device)
        hidden = ev.base(input_ids=ids, use_cache=False).last_hidden_state
        out = []
        for r, d in enumerate(docs):
            a = d.answer_start
            logits = ev.model.lm_head(hidden[r, a - 1 : d.ids.numel() - 1]).float()
            out.append(float(nn.functional.cross_entropy(logits, ids[r, a:], reduction="sum")))
        return out

    def __call__(self, fs: FactorSet) -> float:
        total, count, _ = self.nll(fs)
        return math.exp(total / count)

    def describe(self) -> dict[str, Any]:
        """What the objective scores (for a set's provenance)."""
        return {
            "documents": len(self.docs),
            "answer_tokens": sum(d.answer_len for d in self.docs),
            "tasks": sorted({d.task for d in self.docs}),
            "depths": sorted({d.depth for d in self.docs}),
            "kinds": list(dict.fromkeys(d.kind for d in self.docs)),
        }


def build_docs(
    ev: Any,
    length: int,
    kinds: Sequence[str],
    tasks: Sequence[str],
    depths: Sequence[float],
    samples: int,
    seed: int,
    template: str = "compact",
) -> list[NeedleDoc]:
    """Task documents of at most ``length`` tokens (prompt + answer; as close to it as the tokenizer allows),
    for every kind × task × depth × sample; deterministic for a seed."""
    measure = None if ev.tokenizer is None else (lambda text: int(ev.tokenize(text).numel()))
    docs = []
    for k, kind in enumerate(kinds):
        hay = haystack_text(kind)
        rng = random.Random(seed * 1_000_003 + k)
        for task in tasks:
            for depth in depths:
                for _ in range(samples):
                    docs.append(fit_document(ev, task, length, depth, hay, rng, template, measure, kind))
    return docs


def fit_document(
    ev: Any, task: str, length: int, depth: float, hay: str, rng: random.Random, template: str, measure: Any, kind: str
) -> NeedleDoc:
    """One document whose prompt + answer fit ``length`` tokens: the prompt is made ``answer`` tokens shorter,
    re-drawn from the same random state (so the same needle and query) until the two fit."""
    from factors.evaluation.tasks import make_prompt

    state = rng.getstate()
    reserve = 0
    for _ in range(4):
        rng.setstate(state)
        try:
            p = make_prompt(task, length - reserve, depth, hay, rng, template=template, measure=measure)
        except ValueError as err:
            raise FactorSetError(f"needle-ppl at {length}: {err}") from None
        prompt, answer = ev.tokenize(p.prompt), ev.tokenize(p.answer)
        if prompt.numel() + answer.numel() <= length:
            return NeedleDoc(torch.cat([prompt, answer]), prompt.numel(), task, depth, kind)
        reserve = prompt.numel() + answer.numel() - length + reserve
    raise FactorSetError(f"could not fit a {task} document with its answer into {length} tokens")


def make_fitness(
    ev: Any, plan: Any, tokens: Sequence[torch.Tensor], length: int, samples: int, objective: str
) -> tuple[Fitness, dict[str, Any]]:
    """The fitness of one search at ``length`` under ``plan`` (a SearchPlan), and what it measures (for the
    set's provenance)."""
    if objective == "ppl":
        return ppl_fitness(ev, tokens, length, samples, plan.window_seed), {"objective": "ppl"}
    if objective == "needle-ppl":
        needle = NeedleObjective(
            ev,
            length,
            text_specs(plan.text),
            tasks=plan.needle_tasks,
            depths=plan.needle_depths,
            samples=plan.needle_samples,
            seed=plan.window_seed,
            template=plan.needle_template,
        )
        return needle, {"objective": "needle-ppl", "needle": needle.describe()}
    raise FactorSetError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
