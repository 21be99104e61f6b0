"""Which factor set serves a request, and what happens when its generation outgrows that set.

Three policies (server option ``--policy``, per request ``vllm_xargs: {"longrope_policy": ...}``):

- ``upgrade`` (default): start on the smallest set whose window holds the prompt — Hugging Face's choice by
  current length — and, when generation outgrows that window, move to the smallest larger set that holds the
  sequence, recomputing its KV cache under that set (the engine does the move; see :func:`phase_limit` and
  :func:`upgrade_target`).
- ``reserve``: start on the smallest set whose window holds prompt + budget (max_tokens, or the default
  reserve) and stop at that window (finish_reason ``length``).
- ``pin``: start like ``upgrade``, never move; stop at the window.

Pure Python (no vLLM): the table of live sets is an immutable snapshot swapped atomically on hot-load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from factors.schema import FactorSet

Policy = Literal["upgrade", "reserve", "pin"]
POLICIES: tuple[str, ...] = get_args(Policy)
DEFAULT_POLICY: Policy = "upgrade"


def check_policy(value: object) -> Policy:
    """A policy name from a request or an option, or a ValueError that lists the valid ones."""
    if value not in POLICIES:
        raise ValueError(f"longrope_policy must be one of {', '.join(POLICIES)}; got {value!r}")
    return value  # type: ignore[return-value]


class RequestTooLong(ValueError):
    """No loaded set's window can hold the request."""


@dataclass(eq=False)
class Assignment:
    """The set a request runs on and its generation budget (over all its sets, counted from the prompt).
    ``started``/``ended`` track the admission so the engine counts it on its version exactly once. After an
    upgrade, ``upgraded_to`` is the assignment of the larger set the request moved to."""

    set: FactorSet
    max_tokens: int
    prompt_tokens: int
    policy: Policy = "reserve"
    started: bool = False
    ended: bool = False
    upgraded_to: Assignment | None = None

    def chain(self) -> list[Assignment]:
        """This assignment and the ones its request moved to, in order."""
        out = [self]
        while out[-1].upgraded_to is not None:
            out.append(out[-1].upgraded_to)
        return out

    @property
    def final(self) -> Assignment:
        return self.chain()[-1]

    @property
    def upgrades(self) -> str | None:
        """``a@1>b@2`` when the request moved, else None (the ``x-longrope-upgrades`` value)."""
        chain = self.chain()
        return ">".join(a.key for a in chain) if len(chain) > 1 else None

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
    """Admission: which set a request starts on, and its generation budget (see the module docstring).

    Budgets: with ``reserve`` and ``pin`` generation is capped at the chosen set's window; with ``upgrade`` at
    the largest window (or max_tokens). A request whose max_tokens cannot fit even the largest window is
    refused, whatever the policy."""

    default_reserve: int = 256
    default_policy: Policy = DEFAULT_POLICY

    def assign(
        self, table: SetTable, prompt_tokens: int, max_tokens: int | None, policy: Policy | None = None
    ) -> Assignment:
        policy = check_policy(policy or self.default_policy)
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
        if policy == "reserve":
            budget = max_tokens if max_tokens is not None else self.default_reserve
            needed = prompt_tokens + budget
        else:  # by the prompt alone; ``upgrade`` may start on a window the prompt exactly fills (as HF does)
            needed = prompt_tokens if policy == "upgrade" else prompt_tokens + 1
        chosen = next((fs for fs in table.sets if fs.max_len >= needed), None)
        if chosen is None:  # only without explicit max_tokens: the reserve does not fit, cap instead
            chosen = table.sets[-1]
        cap = (largest if policy == "upgrade" else chosen.max_len) - prompt_tokens
        return Assignment(chosen, min(max_tokens, cap) if max_tokens is not None else cap, prompt_tokens, policy)


def phase_limit(assignment: Assignment, table: SetTable, seq_len: int) -> tuple[int, bool]:
    """How many tokens a request of current length ``seq_len`` may generate on its set, and whether
    reaching that limit means moving up (policy ``upgrade`` with a larger set live).

    The set's table rows cover positions ``0 … window-1``. A token sampled from the logits at position
    ``window-1`` needs no row of its own, so on the way up a request generates until it is
    ``window + 1`` tokens long — exactly when Hugging Face's Phi-3 switches to the long factors and re-runs
    the sequence. Where it cannot move up, it stops when it is ``window`` tokens long (vLLM's limit)."""
    window = assignment.set.max_len
    if assignment.policy == "upgrade" and table.largest_window > window:
        return window - seq_len + 1, True
    return window - seq_len, False


def upgrade_target(table: SetTable, seq_len: int) -> FactorSet | None:
    """The smallest live set whose window holds a sequence of ``seq_len`` tokens (None: no set does)."""
    return next((fs for fs in table.sets if fs.max_len >= seq_len), None)
