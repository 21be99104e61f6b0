"""Which factor set serves a request: the smallest whose window holds prompt + generation budget.

Pure Python (no vLLM): the table of live sets is an immutable snapshot swapped atomically on hot-load,
so a request sees one consistent table from admission to its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from factors.schema import FactorSet


class RequestTooLong(ValueError):
    """No loaded set's window can hold the request."""


@dataclass(eq=False)
class Assignment:
    """The set a request runs on, for its whole life, and its generation cap. ``started``/``ended``
    track the admission so the engine counts it on its version exactly once."""

    set: FactorSet
    max_tokens: int
    prompt_tokens: int
    started: bool = False
    ended: bool = False

    @property
    def key(self) -> str:
        return self.set.label

    @property
    def cache_salt(self) -> str:
        """Prefix-cache salt: blocks are shared only between requests of the same set and version."""
        return f"longrope:{self.key}"


@dataclass(frozen=True)
class SetTable:
    """An immutable snapshot of the live sets (one version per name), smallest window first."""

    sets: tuple[FactorSet, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [fs.name for fs in self.sets]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate set names in table: {names}")
        object.__setattr__(self, "sets", tuple(sorted(self.sets, key=lambda fs: (fs.max_len, fs.name))))

    def get(self, name: str) -> FactorSet | None:
        return next((fs for fs in self.sets if fs.name == name), None)

    @property
    def largest_window(self) -> int:
        return max((fs.max_len for fs in self.sets), default=0)

    def with_set(self, fs: FactorSet) -> SetTable:
        """A new table where ``fs`` replaces the set of the same name (or is added)."""
        return SetTable(tuple(s for s in self.sets if s.name != fs.name) + (fs,))

    def without(self, name: str) -> SetTable:
        return SetTable(tuple(s for s in self.sets if s.name != name))

    def describe(self) -> str:
        return ", ".join(f"{fs.label} (≤{fs.max_len})" for fs in self.sets) or "none"


@dataclass(frozen=True)
class AdmissionPolicy:
    """``reserve`` admission: pick the smallest window ≥ prompt + budget, where the budget is the
    request's max_tokens or, when it gave none, ``default_reserve`` tokens; generation is capped at the
    chosen set's window (finish_reason ``length``)."""

    default_reserve: int = 256

    def assign(self, table: SetTable, prompt_tokens: int, max_tokens: int | None) -> Assignment:
        if not table.sets:
            raise RequestTooLong("no factor set is loaded")
        if prompt_tokens < 1:
            raise ValueError("the prompt is empty; send at least one token")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")
        largest = table.largest_window
        if prompt_tokens >= largest:
            raise RequestTooLong(
                f"the prompt has {prompt_tokens} tokens, but the largest factor set window is {largest} tokens"
                f" ({table.describe()}); shorten the prompt to at most {largest - 1} tokens"
            )
        if max_tokens is not None and prompt_tokens + max_tokens > largest:
            raise RequestTooLong(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {prompt_tokens + max_tokens} tokens"
                f" exceeds the largest factor set window of {largest} tokens ({table.describe()});"
                f" ask for max_tokens ≤ {largest - prompt_tokens}"
            )
        budget = max_tokens if max_tokens is not None else self.default_reserve
        needed = prompt_tokens + budget
        chosen = next((fs for fs in table.sets if fs.max_len >= needed), None)
        if chosen is None:  # only without explicit max_tokens: the reserve does not fit, cap instead
            chosen = table.sets[-1]
        cap = chosen.max_len - prompt_tokens
        return Assignment(chosen, min(max_tokens, cap) if max_tokens is not None else cap, prompt_tokens)
