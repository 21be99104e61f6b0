"""Which factor set serves a request, and what happens when its generation outgrows that set.

Three policies (server option ``--policy``, per request ``vllm_xargs: {"longrope_policy": ...}``):

- ``upgrade`` (default): start on the smallest set whose window holds the prompt — Hugging Face's choice by
  current length — and, when generation outgrows that window, move to the smallest larger set that holds the
  sequence, recomputing its KV cache under that set (the engine does the move; see :func:`phase_limit` and
  :func:`upgrade_target`).
- ``reserve``: start on the smallest set whose window holds prompt + budget (max_tokens, or the default
  reserve) and stop at that window (finish_reason ``length``).
- ``pin``: start like ``upgrade``, never move; stop at the window.

Routing: automatic admission (all three policies, and every move up) picks among the sets whose routing is
``auto`` only. A set loaded with routing ``explicit`` serves only requests that name it
(``vllm_xargs: {"longrope_factor_set": NAME}``); a named request — of either routing — runs on that set,
pinned to it (:meth:`AdmissionPolicy.assign_named`).

Pure Python (no vLLM): the table of live sets is an immutable snapshot swapped atomically on hot-load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from factors.schema import FactorSet

from .protocol import FACTOR_SET_XARG, ROUTINGS, Routing

Policy = Literal["upgrade", "reserve", "pin"]
POLICIES: tuple[str, ...] = get_args(Policy)
DEFAULT_POLICY: Policy = "upgrade"


def check_policy(value: object) -> Policy:
    """A policy name from a request or an option, or a ValueError that lists the valid ones."""
    if value not in POLICIES:
        raise ValueError(f"longrope_policy must be one of {', '.join(POLICIES)}; got {value!r}")
    return value  # type: ignore[return-value]


def check_routing(value: object) -> Routing:
    """A routing value from an admin call, or a ValueError that lists the valid ones."""
    if value not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}; got {value!r}")
    return value  # type: ignore[return-value]


class RequestTooLong(ValueError):
    """No loaded set's window can hold the request (or the named set's window cannot)."""


class UnknownFactorSet(ValueError):
    """A request named a set that is not live (or named it with something that is not a name)."""

    param = f"vllm_xargs.{FACTOR_SET_XARG}"


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
    """An immutable snapshot of the live sets (one version per name), smallest window first, and which of
    them automatic routing may pick (all but the ``explicit`` names)."""

    sets: tuple[FactorSet, ...] = field(default_factory=tuple)
    explicit: frozenset[str] = frozenset()
    auto: tuple[FactorSet, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [fs.name for fs in self.sets]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate set names in table: {names}")
        object.__setattr__(self, "sets", tuple(sorted(self.sets, key=lambda fs: (fs.max_len, fs.name))))
        object.__setattr__(self, "explicit", frozenset(n for n in self.explicit if n in names))
        object.__setattr__(self, "auto", tuple(fs for fs in self.sets if fs.name not in self.explicit))

    def get(self, name: str) -> FactorSet | None:
        return next((fs for fs in self.sets if fs.name == name), None)

    def routing(self, name: str) -> Routing:
        return "explicit" if name in self.explicit else "auto"

    @property
    def largest_window(self) -> int:
        """The largest window automatic routing reaches (0 when no set is auto)."""
        return max((fs.max_len for fs in self.auto), default=0)

    def with_set(self, fs: FactorSet, routing: Routing | None = None) -> SetTable:
        """A new table where ``fs`` replaces the set of the same name (or is added). ``routing`` None keeps
        the name's routing (``auto`` for a new name)."""
        explicit = set(self.explicit)
        if routing == "explicit":
            explicit.add(fs.name)
        elif routing == "auto":
            explicit.discard(fs.name)
        return SetTable(tuple(s for s in self.sets if s.name != fs.name) + (fs,), frozenset(explicit))

    def with_routing(self, name: str, routing: Routing) -> SetTable:
        fs = self.get(name)
        return self if fs is None else self.with_set(fs, routing)

    def without(self, name: str) -> SetTable:
        return SetTable(tuple(s for s in self.sets if s.name != name), self.explicit)

    def describe(self, auto_only: bool = False) -> str:
        """``a@1 (≤256), b@2 (≤512, explicit)``: the live sets (only those routing picks with ``auto_only``)."""
        shown = self.auto if auto_only else self.sets
        marks = {fs.name: ", explicit" if fs.name in self.explicit else "" for fs in shown}
        return ", ".join(f"{fs.label} (≤{fs.max_len}{marks[fs.name]})" for fs in shown) or "none"

    def routing_loss(self, after: SetTable) -> str | None:
        """What changing this table into ``after`` would leave automatic routing without (None: nothing).
        A change must neither leave no ``auto`` set nor lower the largest window the ``auto`` sets reach
        (requests served today would be refused); sets may come and go below that window."""
        if self.auto and not after.auto:
            return "no set for automatic routing (requests that name no set)"
        if after.largest_window < self.largest_window:
            return (
                f"no set for automatic routing of {after.largest_window + 1}–{self.largest_window} tokens"
                f" (the auto sets would reach {after.largest_window})"
            )
        return None


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
        """Automatic routing: the smallest ``auto`` set the policy's rule admits the request on."""
        policy = check_policy(policy or self.default_policy)
        if not table.auto:
            raise RequestTooLong("no factor set is loaded for automatic routing")
        _check_request(prompt_tokens, max_tokens)
        largest = table.largest_window
        if prompt_tokens >= largest:
            raise RequestTooLong(
                f"the prompt has {prompt_tokens} tokens, but the largest factor set window is {largest} tokens"
                f" ({table.describe(auto_only=True)}); shorten the prompt to at most {largest - 1} tokens"
            )
        if max_tokens is not None and prompt_tokens + max_tokens > largest:
            raise RequestTooLong(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {prompt_tokens + max_tokens} tokens"
                f" exceeds the largest factor set window of {largest} tokens ({table.describe(auto_only=True)});"
                f" ask for max_tokens ≤ {largest - prompt_tokens}"
            )
        if policy == "reserve":
            budget = max_tokens if max_tokens is not None else self.default_reserve
            needed = prompt_tokens + budget
        else:  # by the prompt alone; ``upgrade`` may start on a window the prompt exactly fills (as HF does)
            needed = prompt_tokens if policy == "upgrade" else prompt_tokens + 1
        chosen = next((fs for fs in table.auto if fs.max_len >= needed), None)
        if chosen is None:  # only without explicit max_tokens: the reserve does not fit, cap instead
            chosen = table.auto[-1]
        cap = (largest if policy == "upgrade" else chosen.max_len) - prompt_tokens
        return Assignment(chosen, min(max_tokens, cap) if max_tokens is not None else cap, prompt_tokens, policy)

    def assign_named(
        self, table: SetTable, name: object, prompt_tokens: int, max_tokens: int | None, policy: object = None
    ) -> Assignment:
        """A request that names its set (``auto`` or ``explicit``) runs on exactly that set, pinned: it never
        moves, and prompt + budget (max_tokens, else the default reserve) must fit the set's window — what
        an A/B measurement of that set needs. ``policy`` is the request's own (None: none given); ``upgrade``
        contradicts naming a set and is refused."""
        if policy is not None and check_policy(policy) == "upgrade":
            raise ValueError(
                f"longrope_policy 'upgrade' cannot apply to a request naming its set ({FACTOR_SET_XARG}): a named"
                " request stays on that set; drop longrope_policy or send pin or reserve"
            )
        if not isinstance(name, str) or not name:
            raise UnknownFactorSet(f"{FACTOR_SET_XARG} must be the name of a live factor set, got {name!r}")
        fs = table.get(name)
        if fs is None:
            raise UnknownFactorSet(f"{FACTOR_SET_XARG} {name!r} is not a live factor set; live: {table.describe()}")
        _check_request(prompt_tokens, max_tokens)
        window = fs.max_len
        if prompt_tokens >= window:
            raise RequestTooLong(
                f"the prompt has {prompt_tokens} tokens, but the window of {fs.label}, the set named in"
                f" {FACTOR_SET_XARG}, is {window} tokens; shorten the prompt to at most {window - 1} tokens or"
                f" name a set with a larger window (live: {table.describe()})"
            )
        if max_tokens is not None:
            budget, asked = max_tokens, f"max_tokens ({max_tokens})"
        else:
            budget, asked = self.default_reserve, f"the default reserve ({self.default_reserve}; no max_tokens sent)"
        if prompt_tokens + budget > window:
            raise RequestTooLong(
                f"prompt ({prompt_tokens} tokens) + {asked} = {prompt_tokens + budget} tokens exceeds the window"
                f" of {fs.label}, the set named in {FACTOR_SET_XARG}, of {window} tokens;"
                f" ask for max_tokens ≤ {window - prompt_tokens}"
            )
        cap = window - prompt_tokens
        return Assignment(fs, min(max_tokens, cap) if max_tokens is not None else cap, prompt_tokens, "pin")


def _check_request(prompt_tokens: int, max_tokens: int | None) -> None:
    if prompt_tokens < 1:
        raise ValueError("the prompt is empty; send at least one token")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")


def phase_limit(assignment: Assignment, table: SetTable, seq_len: int) -> tuple[int, bool]:
    """How many tokens a request of current length ``seq_len`` may generate on its set, and whether
    reaching that limit means moving up (policy ``upgrade`` with a larger ``auto`` set live).

    The set's table rows cover positions ``0 … window-1``. A token sampled from the logits at position
    ``window-1`` needs no row of its own, so on the way up a request generates until it is
    ``window + 1`` tokens long — exactly when Hugging Face's Phi-3 switches to the long factors and re-runs
    the sequence. Where it cannot move up, it stops when it is ``window`` tokens long (vLLM's limit)."""
    window = assignment.set.max_len
    if assignment.policy == "upgrade" and table.largest_window > window:
        return window - seq_len + 1, True
    return window - seq_len, False


def upgrade_target(table: SetTable, seq_len: int) -> FactorSet | None:
    """The smallest ``auto`` set whose window holds a sequence of ``seq_len`` tokens (None: no set does);
    a request never moves onto an explicit set."""
    return next((fs for fs in table.auto if fs.max_len >= seq_len), None)
