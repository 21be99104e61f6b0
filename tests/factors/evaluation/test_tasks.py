"""The task-prompt generator: the compact format exactly as docs/ruler.md states it, english lengths,
determinism and errors. Pure Python, no model."""

from __future__ import annotations

import math
import random
import re
from fractions import Fraction

import pytest

from factors.evaluation.tasks import (
    TASKS,
    TaskPrompt,
    answer_span,
    clean_haystack,
    depth_grid,
    is_correct,
    make_prompt,
    make_suite,
    min_length,
)

RAW = (
    "The quick brown fox <jumps> over = the lazy dog? Naïve café, tab\there.\r\n"
    "Line two: a < b and c > d, x = y?\n"
    + "".join(f"Sentence {i} of plain filler text goes here.\n" for i in range(4000))
)
HAY = clean_haystack(RAW)
NEEDLE = re.compile(r"<([a-z]{3,8})=([0-9]{5}|[a-z]{3,8})>")
KEY = re.compile(r"[a-z]{3,8}")
VALUE = re.compile(r"[0-9]{5}")


def haystack_of(p: TaskPrompt) -> str:
    """The prompt without its needles and its query."""
    text, cut = p.prompt, p.prompt.rindex("\n?")
    for a, b in sorted(p.needle_spans, reverse=True):
        text = text[:a] + text[b:]
        cut -= b - a
    return text[:cut]


def offset_in_haystack(p: TaskPrompt, span: tuple[int, int]) -> int:
    """How many haystack bytes come before the needle at ``span``."""
    return span[0] - sum(b - a for a, b in p.needle_spans if b <= span[0])


def floor_depth(d: float, h: int) -> int:
    return math.floor(Fraction(str(d)) * h)


def test_clean_haystack_keeps_printable_ascii_and_newlines() -> None:
    assert clean_haystack("a<b>c=d?e\r\n\tf é ~") == "abcde\nf  ~"
    assert all(c == "\n" or (" " <= c <= "~" and c not in "<>=?") for c in HAY)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [128, 200, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_compact_exact_bytes_and_depth(task: str, length: int, depth: float) -> None:
    for seed in range(5):
        p = make_prompt(task, length, depth, HAY, random.Random(seed))
        assert (p.task, p.template, p.length, p.depth) == (task, "compact", length, depth)
        assert len(p.prompt.encode("utf-8")) == length
        assert p.prompt.isascii()
        h = haystack_of(p)
        assert len(h) == length - sum(b - a for a, b in p.needle_spans) - len(p.prompt) + p.prompt.rindex("\n?")
        assert h in HAY  # one contiguous window of the haystack
        assert offset_in_haystack(p, p.needle_spans[0]) == floor_depth(depth, len(h))
        for a, b in p.needle_spans:
            assert NEEDLE.fullmatch(p.prompt[a:b])


@pytest.mark.parametrize("seed", range(30))
def test_niah_single(seed: int) -> None:
    p = make_prompt("niah_single", 256, 0.5, HAY, random.Random(seed))
    ((a, b),) = p.needle_spans
    key, value = NEEDLE.fullmatch(p.prompt[a:b]).groups()
    assert KEY.fullmatch(key) and VALUE.fullmatch(value)
    assert p.prompt.endswith(f"\n?{key}=")
    assert p.answer == f"{value}>" == answer_span(p)
    assert p.prompt.count("<") == p.prompt.count(">") == 1 and p.prompt.count("?") == 1


@pytest.mark.parametrize("seed", range(30))
def test_niah_multikey(seed: int) -> None:
    p = make_prompt("niah_multikey", 256, 0.25, HAY, random.Random(seed))
    pairs = [NEEDLE.fullmatch(p.prompt[a:b]).groups() for a, b in p.needle_spans]
    assert len(pairs) == 4
    keys, values = [k for k, _ in pairs], [v for _, v in pairs]
    assert len(set(keys)) == 4 and len(set(values)) == 4
    assert all(KEY.fullmatch(k) and VALUE.fullmatch(v) for k, v in pairs)
    # the asked needle is the one at depth (needle_spans[0]), the distractors in prompt order after it
    assert p.prompt.endswith(f"\n?{keys[0]}=") and p.answer == f"{values[0]}>"
    assert [s[0] for s in p.needle_spans[1:]] == sorted(s[0] for s in p.needle_spans[1:])


def test_multikey_asks_every_position_and_distractors_go_anywhere() -> None:
    asked_rank, before = set(), 0
    for seed in range(200):
        p = make_prompt("niah_multikey", 512, 0.5, HAY, random.Random(seed))
        asked_rank.add(sorted(p.needle_spans).index(p.needle_spans[0]))
        before += sum(s[0] < p.needle_spans[0][0] for s in p.needle_spans[1:])
    assert asked_rank == {0, 1, 2, 3}
    assert 0 < before < 3 * 200


@pytest.mark.parametrize("seed", range(30))
def test_niah_multivalue_in_order(seed: int) -> None:
    p = make_prompt("niah_multivalue", 256, 0.2, HAY, random.Random(seed))
    pairs = [NEEDLE.fullmatch(p.prompt[a:b]).groups() for a, b in p.needle_spans]
    assert len(pairs) == 3 and len({k for k, _ in pairs}) == 1 and len({v for _, v in pairs}) == 3
    assert list(p.needle_spans) == sorted(p.needle_spans)  # the first needle is the one at depth
    assert p.prompt.endswith(f"\n?{pairs[0][0]}*=")
    assert p.answer == ",".join(v for _, v in pairs) + ">"


@pytest.mark.parametrize("seed", range(30))
def test_vt_chain(seed: int) -> None:
    p = make_prompt("vt", 256, 0.4, HAY, random.Random(seed))
    assert list(p.needle_spans) == sorted(p.needle_spans)
    (k1, value), (k2, ref2), (k3, ref3) = [NEEDLE.fullmatch(p.prompt[a:b]).groups() for a, b in p.needle_spans]
    assert VALUE.fullmatch(value) and ref2 == k1 and ref3 == k2 and len({k1, k2, k3}) == 3
    assert p.prompt.endswith(f"\n?{value}=")
    assert p.answer == f"{k1},{k2},{k3}>"


def test_key_lengths_cover_the_alphabet() -> None:
    sizes = set()
    for seed in range(300):
        p = make_prompt("niah_single", 128, 0.5, HAY, random.Random(seed))
        sizes.add(len(p.prompt[p.prompt.rindex("?") + 1 : -1]))
    assert sizes == set(range(3, 9))


def test_depth_extremes() -> None:
    p = make_prompt("niah_single", 128, 0.0, HAY, random.Random(0))
    assert p.prompt.startswith("<") and p.needle_spans[0][0] == 0
    p = make_prompt("niah_single", 128, 1.0, HAY, random.Random(0))
    assert p.prompt[: p.needle_spans[0][1]].endswith(">") and p.prompt[p.needle_spans[0][1] :].startswith("\n?")
    p = make_prompt("vt", 128, 1.0, HAY, random.Random(0))
    assert p.prompt[p.needle_spans[0][0] : p.needle_spans[-1][1]].count("<") == 3  # chain adjacent at the end


def test_minimum_length_exactly() -> None:
    for task in TASKS:
        need = min_length(task)
        assert need == {"niah_single": 27, "niah_multikey": 75, "niah_multivalue": 60, "vt": 62}[task]
        for seed in range(20):  # longest keys still fit, the haystack may be empty
            assert len(make_prompt(task, need, 0.5, HAY, random.Random(seed)).prompt) == need
        with pytest.raises(ValueError, match=f"too short for {task}.*minimum is {need}"):
            make_prompt(task, need - 1, 0.5, HAY, random.Random(0))


def test_errors_name_what_is_wrong() -> None:
    rng = random.Random(0)
    with pytest.raises(ValueError, match="unknown task 'niah'.*niah_single"):
        make_prompt("niah", 128, 0.5, HAY, rng)
    with pytest.raises(ValueError, match="unknown template 'chat'.*compact, english"):
        make_prompt("niah_single", 128, 0.5, HAY, rng, template="chat")
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
            make_prompt("niah_single", 128, bad, HAY, rng)
    with pytest.raises(ValueError, match="haystack has 50 characters.*needs at least"):
        make_prompt("niah_single", 128, 0.5, HAY[:50], rng)
    with pytest.raises(ValueError, match="not cleaned.*clean_haystack"):
        make_prompt("niah_single", 128, 0.5, RAW[:200], random.Random(0))
    with pytest.raises(ValueError, match="samples must be >= 1"):
        make_suite(["vt"], [128], 3, 0, HAY, 0)
    with pytest.raises(ValueError, match="depths must be >= 1"):
        make_suite(["vt"], [128], 0, 1, HAY, 0)


def test_suite_is_deterministic_and_cells_are_independent() -> None:
    a = make_suite(TASKS, [128, 256], 11, 3, HAY, seed=7)
    assert len(a) == 4 * 2 * 11 * 3
    assert a == make_suite(TASKS, [128, 256], 11, 3, HAY, seed=7)
    assert a != make_suite(TASKS, [128, 256], 11, 3, HAY, seed=8)
    assert sorted({p.depth for p in a}) == [i / 10 for i in range(11)]
    only_vt = make_suite(["vt"], [256], 11, 3, HAY, seed=7)
    assert only_vt == [p for p in a if p.task == "vt" and p.length == 256]
    assert len({p.prompt for p in a}) == len(a)


def test_depth_grid() -> None:
    assert depth_grid(11) == tuple(i / 10 for i in range(11))
    assert depth_grid(1) == (0.5,) and depth_grid(2) == (0.0, 1.0)
    assert depth_grid([0.25, 1]) == (0.25, 1.0)


def test_is_correct() -> None:
    assert is_correct("48213>\nmore", "48213>")
    assert not is_correct("4821>", "48213>") and not is_correct(" 48213>", "48213>")


def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_english_fits_the_measure(task: str, depth: float) -> None:
    for length in (200, 500):
        p = make_prompt(task, length, depth, HAY, random.Random(3), template="english", measure=words)
        assert length - 12 <= words(p.prompt) <= length  # the longest that fits (word-snapped haystack)
        assert (
            not p.prompt.endswith(" ")
            and p.answer.startswith(" ")
            and all(a in p.prompt for a in p.answer[1:].split(", "))
        )
        first = p.prompt[p.needle_spans[0][0] : p.needle_spans[0][1]]
        assert first.startswith(" ") and first.endswith(". ")
        before = p.prompt[: p.needle_spans[0][0]]
        assert before == "" or before[-1].isspace()  # never splits a word
    default = make_prompt(task, 900, depth, HAY, random.Random(3), template="english")
    assert len(default.prompt.encode()) <= 900  # default measure: UTF-8 bytes


def test_english_answers() -> None:
    p = make_prompt("vt", 400, 0.5, HAY, random.Random(1), template="english", measure=words)
    keys = p.answer.strip().split(", ")
    assert len(keys) == 3 and f"Variable {keys[1]} is set to variable {keys[0]}." in p.prompt
    p = make_prompt("niah_multivalue", 400, 0.5, HAY, random.Random(1), template="english", measure=words)
    values = p.answer.strip().split(", ")
    assert [p.prompt.index(v) for v in values] == sorted(p.prompt.index(v) for v in values)
    with pytest.raises(ValueError, match="give a longer haystack"):
        make_prompt("niah_single", 400, 0.5, HAY[:300], random.Random(1), template="english", measure=words)


# Haystack kinds (factors.evaluation.corpus): the fixture trains on stdlib and pydoc, is measured on licenses.


def test_text_kinds_split_disjointly() -> None:
    from factors.evaluation.corpus import LICENSES_DIR, text_source

    docs = {s: text_source(f"pydoc:{s}") for s in ("train", "search", "heldout")}
    assert all(len(t) > 20_000 for t in docs.values())
    assert "assert" in docs["train"] + docs["search"] + docs["heldout"]
    assert text_source("pydoc:search", 500) == docs["search"][:500]
    mixed = text_source("pydoc:search+pydoc:heldout", 1000)
    assert mixed == docs["search"][:500] + docs["heldout"][:500]
    if LICENSES_DIR.is_dir():
        lic = {s: text_source(f"licenses:{s}") for s in ("train", "search", "heldout")}
        assert all(len(t) > 10_000 and clean_haystack(t).isascii() for t in lic.values())
        paras = [set(t.split("\n\n")) - {""} for t in lic.values()]
        assert not (paras[0] & paras[1]) and not (paras[0] & paras[2]) and not (paras[1] & paras[2])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        text_source("pydoc:dev")
    with pytest.raises(ValueError, match="KIND:SPLIT with KIND one of stdlib, pydoc, licenses, copyright"):
        text_source("/nonexistent/file.txt")
