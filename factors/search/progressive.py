"""Progressive extension (2× → 4× → 8×, each stage seeded from the last) and the short-window
readjustment: the long and short sets the server switches between.

Fitness is perplexity on fixed windows of one or more texts, or needle-driven perplexity on fixed task
documents (same windows or documents for every individual of a stage; factors.search.objective). Every
function takes the run's :class:`~factors.search.evolution.SearchPlan`; :func:`run_search` is the whole
``longrope-factors search``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from factors.evaluation.evaluator import Evaluator
from factors.schema import FactorSet, FactorSetError
from factors.search.evolution import LongRopeSearch, SearchConfig, SearchPlan, scaled_seed
from factors.search.objective import make_fitness, text_specs


def text_tokens(ev: Evaluator, spec: str) -> torch.Tensor:
    """Token ids of the text a spec names (a file, or stdlib:SPLIT; see factors.evaluation.corpus)."""
    from factors.evaluation.corpus import text_source

    try:
        return ev.tokenize(text_source(spec))
    except ValueError as err:
        raise FactorSetError(str(err)) from None


def texts_tokens(ev: Evaluator, spec: str) -> list[torch.Tensor]:
    """Token ids of each text of a comma-separated list of specs (several kinds of text, kept apart so that
    each gives its own windows)."""
    return [text_tokens(ev, one) for one in text_specs(spec)]


Tokens = torch.Tensor | Sequence[torch.Tensor]


def _as_list(tokens: Tokens) -> list[torch.Tensor]:
    return [tokens] if isinstance(tokens, torch.Tensor) else list(tokens)


def search_set(
    ev: Evaluator,
    tokens: Tokens,
    plan: SearchPlan,
    config: SearchConfig,
    *,
    name: str,
    checkpoint: str | Path | None = None,
    samples: int | None = None,
    extra_seeds: Sequence[tuple[str, Sequence[float], int]] = (),
    stop_after: int | None = None,
    objective: str | None = None,
) -> tuple[FactorSet, LongRopeSearch]:
    """One search at config.target_len on `tokens` (the texts plan.text names, one tensor per kind), on
    `samples` windows of each (default plan.samples), minimising ``objective`` (default plan.objective); the
    plan gives the window seed, the needle documents, resume and progress."""
    samples = samples or plan.samples
    fitness, measured = make_fitness(
        ev, plan, _as_list(tokens), config.target_len, samples, objective or plan.objective
    )
    prov: dict[str, Any] = {
        "source": str(ev.model_dir),
        "metrics": {
            "data": plan.text,
            "samples": samples,
            "window_seed": plan.window_seed,
            "lengths": [config.target_len],
            **measured,
        },
    }
    search = LongRopeSearch(
        ev.rope.geometry,
        fitness,
        config,
        name=name,
        checkpoint=checkpoint,
        extra_seeds=extra_seeds,
        provenance=prov,
        progress=plan.progress,
    )
    return search.run(resume=plan.resume, stop_after=stop_after), search


def progressive(ev: Evaluator, tokens: Tokens, plan: SearchPlan) -> list[FactorSet]:
    """A chain of searches, one per length of plan.lengths in increasing order, with plan.long's budget;
    stage k+1 is seeded with PI/NTK/YaRN at its length plus stage k's best λ stretched to it. Stage sets
    (and checkpoints) are named NAME-LENGTH."""
    out: list[FactorSet] = []
    for target in plan.lengths:
        extra = [scaled_seed(out[-1], target)] if out else given_seeds(plan, target)
        stem = f"{plan.name}-{target}"
        fs, _ = search_set(
            ev,
            tokens,
            plan,
            replace(plan.long, target_len=target),
            name=stem,
            checkpoint=plan.checkpoint(stem),
            extra_seeds=extra,
        )
        out.append(fs)
    return out


def given_seeds(plan: SearchPlan, target_len: int) -> list[tuple[str, list[float], int]]:
    """plan.seed_sets as seeds of a search at ``target_len``: stretched when shorter, as they are otherwise."""
    out = []
    for fs in plan.seed_sets:
        if fs.max_len < target_len:
            out.append(scaled_seed(fs, target_len))
        else:
            out.append((f"set:{fs.name}", list(fs.factors), fs.n_hat))
    return out


def short_readjust(
    ev: Evaluator,
    tokens: Tokens,
    long_set: FactorSet | None,
    plan: SearchPlan,
    trained_under_long: bool = False,
) -> FactorSet:
    """Search at the original window with plan.short's budget (NAME-short, on plan.short_samples windows):
    seeds are the identity (the model's own in-window ppl) and softened versions of the long set's λ
    (λ^0.5, λ^0.25), so the result never measures worse than the model itself on the search windows. For a
    model fine-tuned under the long set (``trained_under_long``) the long λ itself is a seed too, and the
    search keeps the long set's mscale: that model has learnt those angles and that scale at short positions
    as well."""
    if plan.short is None:
        raise ValueError("the plan has no short search (SearchPlan.short)")
    config = plan.short
    original = ev.rope.geometry.original_max_len
    extra: list[tuple[str, list[float], int]] = []
    high = config.high
    if long_set is not None:
        for power in (1.0, 0.5, 0.25) if trained_under_long else (0.5, 0.25):
            extra.append(("long" if power == 1.0 else f"long^{power}", [f**power for f in long_set.factors], 0))
        high = high or max(2.0, max(long_set.factors))
    # The short set's attention scale: 1 (the model's own) — or, for a model fine-tuned under the long set, that
    # set's, which the model now expects at every position (Phi-3's configs, too, share one attention factor).
    mscale = config.mscale or (long_set.resolved_mscale if trained_under_long and long_set is not None else 1.0)
    cfg = replace(config, target_len=original, seed_methods=("identity",), high=high, mscale=mscale, critical_pair=None)
    stem = f"{plan.name}-short"
    fs, _ = search_set(
        ev,
        tokens,
        plan,
        cfg,
        name=stem,
        checkpoint=plan.checkpoint(stem),
        samples=plan.short_samples,
        extra_seeds=extra,
        objective="ppl",  # in the window every token is near its context: plain perplexity is the measure
    )
    return fs


def with_ppl_table(
    ev: Evaluator,
    fs: FactorSet,
    plan: SearchPlan,
    tokens: torch.Tensor,
    lengths: Sequence[int],
    baselines: Sequence[str],
) -> FactorSet:
    """The set with a ppl table (the set vs baselines at its window, on plan.table_text) in its provenance."""
    sets = [ev.geometry_set(m, fs.max_len) for m in baselines] + [fs]
    records = ev.ppl_table(sets, tokens, list(lengths), plan.table_samples, seed=plan.window_seed)
    metrics = {
        **fs.provenance.metrics,
        "ppl_table": {"text": plan.table_text, "samples": plan.table_samples, "records": records},
    }
    return fs.model_copy(update={"provenance": fs.provenance.model_copy(update={"metrics": metrics})})


def run_search(ev: Evaluator, plan: SearchPlan) -> Iterator[tuple[str, FactorSet]]:
    """The whole ``longrope-factors search``: the long set (one search, or the progressive chain), then the
    optional short readjustment, each with its ppl table when plan.table_text is set. Yields
    ``(role, set)`` as each is ready, role ``"stage"`` (a shorter stage of the chain), ``"long"`` or
    ``"short"``, so a caller can write each before the next search starts."""
    tokens = texts_tokens(ev, plan.text)
    table_tokens = text_tokens(ev, plan.table_text) if plan.table_text else None
    if plan.progressive:
        *stages, long = progressive(ev, tokens, plan)
        for fs in stages:
            yield "stage", fs
    else:
        stem = f"{plan.name}-{plan.long.target_len}"
        long, _ = search_set(
            ev,
            tokens,
            plan,
            plan.long,
            name=plan.name,
            checkpoint=plan.checkpoint(stem),
            extra_seeds=given_seeds(plan, plan.long.target_len),
        )
    if table_tokens is not None:
        long = with_ppl_table(ev, long, plan, table_tokens, [plan.long.target_len], plan.table_baselines)
    yield "long", long
    if plan.short is not None:
        short = short_readjust(ev, tokens, long, plan)
        if table_tokens is not None:
            original = ev.rope.geometry.original_max_len
            short = with_ppl_table(ev, short, plan, table_tokens, [original], ("identity",))
        yield "short", short
