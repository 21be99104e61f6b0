"""RULER-style task prompts (needle in a haystack, multi-key, multi-value, variable tracking), in one place.

The trainer of the retrieval fixture, the offline evaluator and the HTTP client all build their prompts
here, so a prompt is the same wherever it is measured. Pure standard library (``clients/`` imports it
without torch). The ``compact`` format is a public interface, documented verbatim in docs/ruler.md:

- keys: 3-8 lowercase ASCII letters; values: 5 decimal digits; haystack: any text with ``< > = ?`` removed
  (and non-printable bytes other than newline);
- ``niah_single``: one needle ``<KEY=VALUE>``, then the query ``\\n?KEY=``; the answer is ``VALUE>``;
- ``niah_multikey``: 4 needles with distinct keys and values, one asked (``\\n?KEY=`` -> ``VALUE>``);
- ``niah_multivalue``: 3 needles with the same key, ``\\n?KEY*=`` -> ``V1,V2,V3>`` in the order they appear;
- ``vt``: ``<K1=VALUE>`` ... ``<K2=K1>`` ... ``<K3=K2>`` in that order, ``\\n?VALUE=`` -> ``K1,K2,K3>``;
- a prompt of length L is exactly L bytes; the haystack (H bytes) fills what needles and query leave; depth
  d puts the needle at depth (niah_single, the *asked* needle of niah_multikey, the *first* needle of
  niah_multivalue and vt) after floor(d*H) haystack bytes; the others go at rng-chosen haystack offsets
  (anywhere for multikey's distractors, after the first needle for multivalue and vt, in order);
- a prediction is correct when the greedy continuation starts with the answer.

The ``english`` format says the same in sentences for instruct models (see ``_ENGLISH``); its length is
in tokens of the caller's ``measure`` and the prompt is the longest that fits; needles go at word boundaries
(the depth offset moved forward to the next one); the prompt ends without a space and the answer starts
with one (`` 48213``, `` 1, 2, 3``, `` abc, def, ghi``), as BPE tokenizers split words.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "vt")
TEMPLATES: tuple[str, ...] = ("compact", "english")
KEY_ALPHABET = string.ascii_lowercase
KEY_MIN, KEY_MAX = 3, 8
VALUE_DIGITS = 5
NEEDLES = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 3, "vt": 3}
FORBIDDEN = "<>=?"
_DEPTH_EPS = 1e-9  # floor(d*H) with d = 0.3, H = 100 must be 30, not 29 (float rounding)
_BANNED = frozenset(FORBIDDEN)

# The english wording (own, RULER-like). {k} key, {v} value, {p} previous key of a vt chain.
_ENGLISH = {
    "intro": (
        "Below is a long text. Hidden inside it are a few short notes that record a secret number or a "
        "variable. Read everything carefully and remember the notes: a question about them follows the text.\n\n"
    ),
    "needle": " The secret number for {k} is {v}. ",
    "vt_first": " Variable {k} is set to {v}. ",
    "vt_next": " Variable {k} is set to variable {p}. ",
    "niah_single": "\n\nQuestion: what is the secret number for {k}? Answer: The secret number for {k} is",
    "niah_multikey": "\n\nQuestion: what is the secret number for {k}? Answer: The secret number for {k} is",
    "niah_multivalue": (
        "\n\nQuestion: what are all the secret numbers for {k}, in the order they appear in the text? "
        "Answer: The secret numbers for {k} are"
    ),
    "vt": (
        "\n\nQuestion: which variables end up holding the value {v}, in the order they were set? "
        "Answer: The variables holding {v} are"
    ),
}


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt and what its greedy continuation must start with."""

    task: str
    template: str
    length: int  # compact: bytes, exactly; english: tokens by `measure`, at most
    depth: float
    prompt: str
    answer: str
    needle_spans: tuple[tuple[int, int], ...]  # [0] is the needle at depth; compact: bytes = chars (ASCII)


@dataclass(frozen=True)
class _Plan:
    """What a prompt holds, drawn from the rng before the haystack is sized (so sizing draws nothing)."""

    needles: tuple[str, ...]  # in the order they go into the haystack
    query: str
    answer: str
    depth_index: int  # which of `needles` sits at depth d
    others: tuple[float, ...]  # fractions placing the other needles
    after_first: bool  # the others go after the depth needle, in order (multivalue, vt)
    start: float  # fraction placing the haystack window


def clean_haystack(text: str) -> str:
    """The text as a compact haystack: printable ASCII and newlines only, without ``< > = ?``."""
    return "".join(c for c in text if (c == "\n" or " " <= c <= "~") and c not in _BANNED)


def is_correct(continuation: str, answer: str) -> bool:
    """A prediction is correct when the greedy continuation starts with the answer."""
    return continuation.startswith(answer)


def answer_span(p: TaskPrompt) -> str:
    """The text a trainer puts its loss on after ``p.prompt`` (the answer)."""
    return p.answer


def depth_grid(depths: int | Sequence[float]) -> tuple[float, ...]:
    """``11`` -> 0.0, 0.1, ..., 1.0; ``1`` -> 0.5; a sequence is checked and kept."""
    if isinstance(depths, int):
        if depths < 1:
            raise ValueError(f"depths must be >= 1 (got {depths})")
        return (0.5,) if depths == 1 else tuple(round(i / (depths - 1), 10) for i in range(depths))
    out = tuple(float(d) for d in depths)
    if not out:
        raise ValueError("depths is empty; give a count (e.g. 11) or depths in [0, 1]")
    for d in out:
        _check_depth(d)
    return out


def min_length(task: str, template: str = "compact", measure: Callable[[str], int] | None = None) -> int:
    """The shortest length that holds the task's needles and query with the longest keys (no haystack)."""
    _check_task(task, template)
    plan = _plan(task, template, random.Random(0), longest=True)
    if template == "compact":
        return sum(len(n) for n in plan.needles) + len(plan.query)
    return (measure or _utf8_len)(_ENGLISH["intro"] + "".join(plan.needles) + plan.query)


def make_prompt(
    task: str,
    length: int,
    depth: float,
    haystack: str,
    rng: random.Random,
    template: str = "compact",
    measure: Callable[[str], int] | None = None,
) -> TaskPrompt:
    """One prompt of ``length`` (compact: bytes exactly; english: at most that many tokens by ``measure``)."""
    _check_task(task, template)
    _check_depth(depth)
    need = min_length(task, template, measure)
    if length < need:
        raise ValueError(f"length {length} is too short for {task} ({template}): the minimum is {need}")
    plan = _plan(task, template, rng)
    if template == "compact":
        h = length - sum(len(n) for n in plan.needles) - len(plan.query)
        if len(haystack) < h:
            raise ValueError(
                f"haystack has {len(haystack)} characters; a {task} prompt of {length} bytes needs at least {h}"
            )
        window = _window(plan, haystack, h)
        if clean_haystack(window) != window:
            bad = sorted(set(window) - set(clean_haystack(window)))
            raise ValueError(f"haystack is not cleaned (it has {bad!r}); pass it through clean_haystack() first")
        prompt, spans = _assemble(plan, depth, window, "", int)
    else:
        prompt, spans = _fit_english(plan, depth, haystack, length, measure or _utf8_len)
    return TaskPrompt(task, template, length, float(depth), prompt, plan.answer, spans)


def make_suite(
    tasks: Iterable[str],
    lengths: Iterable[int],
    depths: int | Sequence[float],
    samples: int,
    haystack: str,
    seed: int,
    template: str = "compact",
    measure: Callable[[str], int] | None = None,
) -> list[TaskPrompt]:
    """``samples`` prompts per (task, length, depth), task-major. Each cell has its own rng seeded from
    (seed, task, length, depth), so a cell's prompts do not change when other tasks or lengths are added."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1 (got {samples})")
    grid = depth_grid(depths)
    out: list[TaskPrompt] = []
    for task in tasks:
        for length in lengths:
            for d in grid:
                rng = random.Random(f"{seed}:{task}:{length}:{d!r}")
                out.extend(make_prompt(task, length, d, haystack, rng, template, measure) for _ in range(samples))
    return out


def _check_task(task: str, template: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")


def _check_depth(depth: float) -> None:
    if not (isinstance(depth, int | float) and 0.0 <= depth <= 1.0):
        raise ValueError(f"depth must be a number in [0, 1] (got {depth!r})")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _keys(rng: random.Random, n: int, longest: bool) -> list[str]:
    """n distinct keys of 3-8 lowercase letters."""
    keys: list[str] = []
    while len(keys) < n:
        size = KEY_MAX if longest else rng.randint(KEY_MIN, KEY_MAX)
        key = "".join(rng.choice(KEY_ALPHABET) for _ in range(size))
        if key not in keys:
            keys.append(key)
    return keys


def _values(rng: random.Random, n: int) -> list[str]:
    """n distinct values of 5 decimal digits (leading zeros allowed)."""
    picked = rng.sample(range(10**VALUE_DIGITS), n)
    return [f"{v:0{VALUE_DIGITS}d}" for v in picked]


def _plan(task: str, template: str, rng: random.Random, longest: bool = False) -> _Plan:
    n = NEEDLES[task]
    compact = template == "compact"
    e = _ENGLISH
    if task == "vt":
        keys, (value,) = _keys(rng, n, longest), _values(rng, 1)
        if compact:
            needles = [f"<{keys[0]}={value}>"] + [f"<{keys[i]}={keys[i - 1]}>" for i in range(1, n)]
            query, answer = f"\n?{value}=", ",".join(keys) + ">"
        else:
            needles = [e["vt_first"].format(k=keys[0], v=value)]
            needles += [e["vt_next"].format(k=keys[i], p=keys[i - 1]) for i in range(1, n)]
            query, answer = e["vt"].format(v=value), " " + ", ".join(keys)
        depth_index, after_first = 0, True
    else:
        keys = _keys(rng, 1 if task == "niah_multivalue" else n, longest) * (n if task == "niah_multivalue" else 1)
        values = _values(rng, n)
        depth_index = rng.randrange(n) if task == "niah_multikey" else 0
        asked = keys[depth_index]
        if compact:
            needles = [f"<{k}={v}>" for k, v in zip(keys, values, strict=True)]
            star = "*" if task == "niah_multivalue" else ""
            query = f"\n?{asked}{star}="
        else:
            needles = [e["needle"].format(k=k, v=v) for k, v in zip(keys, values, strict=True)]
            query = e[task].format(k=asked)
        if task == "niah_multivalue":
            answer = (",".join(values) + ">") if compact else " " + ", ".join(values)
        else:
            answer = (values[depth_index] + ">") if compact else " " + values[depth_index]
        after_first = task == "niah_multivalue"
    others = tuple(rng.random() for _ in range(n - 1))
    return _Plan(tuple(needles), query, answer, depth_index, others, after_first, rng.random())


def _positions(plan: _Plan, depth: float, h: int, snap: Callable[[int], int]) -> list[int]:
    """Haystack offset of each needle (same order as plan.needles)."""
    first = snap(math.floor(depth * h + _DEPTH_EPS))
    if plan.after_first:  # the others after the first, in order
        rest = sorted(snap(first + min(int(u * (h - first + 1)), h - first)) for u in plan.others)
        return [first, *rest]
    rest = iter(snap(min(int(u * (h + 1)), h)) for u in plan.others)
    return [first if i == plan.depth_index else next(rest) for i in range(len(plan.needles))]


def _window(plan: _Plan, haystack: str, h: int) -> str:
    """The h haystack characters at the plan's rng-chosen offset."""
    start = min(int(plan.start * (len(haystack) - h + 1)), len(haystack) - h)
    return haystack[start : start + h]


def _word_snap(window: str) -> Callable[[int], int]:
    """Moves an offset forward to the next word boundary (so an english needle never splits a word)."""

    def snap(p: int) -> int:
        if p <= 0 or p >= len(window) or window[p - 1].isspace():
            return p
        for q in range(p, len(window)):
            if window[q].isspace():
                return q + 1
        return len(window)

    return snap


def _whole_words(window: str) -> str:
    """The window without a word cut at either end (english prompts never show half a word)."""
    first = next((i for i, c in enumerate(window) if c.isspace()), len(window))
    last = next((i for i in range(len(window) - 1, -1, -1) if window[i].isspace()), -1)
    return window[first : last + 1] if first <= last else ""


def _assemble(
    plan: _Plan, depth: float, window: str, prefix: str, snap: Callable[[int], int]
) -> tuple[str, tuple[tuple[int, int], ...]]:
    """prefix + the window with the needles inserted + query; the needles' spans, depth needle first."""
    positions = _positions(plan, depth, len(window), snap)
    order = sorted(range(len(plan.needles)), key=lambda i: (positions[i], i))
    parts, spans, cursor, offset = [prefix], {}, 0, len(prefix)
    for i in order:
        parts.append(window[cursor : positions[i]])
        offset += positions[i] - cursor
        parts.append(plan.needles[i])
        spans[i] = (offset, offset + len(plan.needles[i]))
        offset += len(plan.needles[i])
        cursor = positions[i]
    parts.extend([window[cursor:], plan.query])
    rest = [spans[i] for i in order if i != plan.depth_index]
    return "".join(parts), (spans[plan.depth_index], *rest)


def _fit_english(
    plan: _Plan, depth: float, haystack: str, length: int, measure: Callable[[str], int]
) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The longest english prompt of at most ``length`` tokens (binary search on the haystack characters)."""

    def build(h: int) -> tuple[str, tuple[tuple[int, int], ...]]:
        window = _whole_words(_window(plan, haystack, h))
        return _assemble(plan, depth, window, _ENGLISH["intro"], _word_snap(window))

    hi = min(len(haystack), 16 * length)
    full = build(hi)
    if measure(full[0]) <= length:
        if hi == len(haystack):
            raise ValueError(
                f"haystack has {len(haystack)} characters, which make only {measure(full[0])} of the {length} "
                "tokens asked; give a longer haystack"
            )
        return full
    lo, best = 0, build(0)  # min_length() checked that the empty haystack fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = build(mid)
        if measure(cand[0]) <= length:
            lo, best = mid, cand
        else:
            hi = mid
    return best
