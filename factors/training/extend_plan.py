"""What one ``longrope-factors extend`` run decides before any model is touched: the plan of its stages
(:class:`ExtendPlan`, with the identity a resumed run must share) and what its report measures
(:class:`ReportPlan`). The run itself is :mod:`.extend`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from factors.evaluation.corpus import text_parts
from factors.search.evolution import SearchConfig, SearchPlan
from factors.search.objective import OBJECTIVES
from factors.training.plan import GUARD_FIELDS, FinetuneConfig


def text_kinds(spec: str) -> set[str]:
    """The texts a spec names (``a+b`` as the corpus reads it, ``a,b`` as a search does): what two stages
    must not share."""
    return {part.strip() for item in spec.split(",") for part in text_parts(item.strip()) if part.strip()}


@dataclass(frozen=True)
class ReportPlan:
    """What the report measures: perplexity on ``text`` at ``lengths`` (``samples`` windows each, or more to
    reach ``tokens`` tokens; offsets seeded by ``seed``) and passkey retrieval at ``passkey_lengths``."""

    def samples_at(self, length: int) -> int:
        return max(self.samples, self.tokens // length)

    text: str = "stdlib:heldout"
    lengths: tuple[int, ...] = ()  # default: the original window × 1, 2, 4, … up to the next target
    samples: int = 4
    tokens: int = 0  # at least this many tokens per length: more windows at short lengths, where they are cheap
    seed: int = 1
    baselines: tuple[str, ...] = ("pi", "ntk", "yarn")
    passkey_lengths: tuple[int, ...] = ()
    passkey_trials: int = 2


@dataclass(frozen=True)
class ExtendPlan:
    """Everything one ``extend`` run decides. ``search`` is the first search (its ``long.target_len`` is the
    first target; its ``short`` the budget of the readjustment); ``next_target`` the window of the second
    search, which runs with the first one's budget (but for the ``next_budget`` overrides) on ``next_samples``
    windows."""

    search: SearchPlan
    finetune: FinetuneConfig
    next_target: int
    next_samples: int | None = None
    next_budget: dict[str, int] = field(default_factory=dict)  # population/parents/... of the next search
    next_objective: str | None = None  # the next search's objective (default: the first search's)
    compare: tuple[str, ...] = ()
    report: ReportPlan = field(default_factory=ReportPlan)

    def __post_init__(self) -> None:
        first = self.search.long.target_len
        if self.search.short is None:
            raise ValueError("the plan needs a short readjustment budget (SearchPlan.short)")
        if self.next_target <= first:
            raise ValueError(f"the next target ({self.next_target}) must exceed the first ({first})")
        if self.finetune.target_len != first:
            raise ValueError(f"the fine-tune length ({self.finetune.target_len}) must be the first target ({first})")
        self.finetune.validate()
        self.next_config.validate()
        if self.finetune.keep_window > 0:
            shared = text_kinds(self.finetune.keep_window_text) & text_kinds(self.report.text)
            if shared:
                raise ValueError(
                    f"the window guard's text and the report's share {', '.join(sorted(shared))}: the guard must"
                    " choose on text the report does not measure on (--ft-keep-window-text)"
                )
        if self.next_objective is not None and self.next_objective not in OBJECTIVES:
            raise ValueError(f"next objective must be one of {', '.join(OBJECTIVES)} (got {self.next_objective!r})")

    @property
    def next_config(self) -> SearchConfig:
        """The next search: the first one's budget and constraints at the next target, with any overrides."""
        return replace(self.search.long, target_len=self.next_target, **self.next_budget)

    @property
    def name(self) -> str:
        return self.search.name

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one (budgets of time and progress aside)."""
        s = self.search
        guarded = self.finetune.keep_window > 0
        search = {
            "long": {**asdict(s.long), "time_budget_s": None},
            "short": {**asdict(s.short), "time_budget_s": None} if s.short else None,
            "stages": list(s.stages),
            "text": s.text,
            "samples": s.samples,
            "window_seed": s.window_seed,
            "short_samples": s.short_samples,
            "name": s.name,
        }
        if s.long.critical_pair is None:  # a plan without LongRoPE2's options keeps its identity of before
            search["long"].pop("critical_pair")
        if s.objective != "ppl" or self.next_objective not in (None, "ppl"):  # what the needle documents are
            search["objective"] = {
                "objective": s.objective,
                "tasks": list(s.needle_tasks),
                "depths": s.needle_depths,
                "samples": s.needle_samples,
                "template": s.needle_template,
            }
        return json.loads(
            json.dumps(
                {
                    "search": search,
                    "finetune": self.finetune.identity(),
                    "next_target": self.next_target,
                    "next_samples": self.next_samples,
                    "next_budget": self.next_budget,
                    **({"next_objective": self.next_objective} if self.next_objective else {}),
                    "compare": list(self.compare),
                    "report": asdict(self.report),
                    # a plan without the window guard keeps its identity of before
                    **({"window_guard": {k: getattr(self.finetune, k) for k in GUARD_FIELDS}} if guarded else {}),
                }
            )
        )
