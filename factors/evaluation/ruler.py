"""The RULER-style suite scored: greedy continuations of task prompts, one record per set, task, length and
depth, and the offline predictor (a Hugging Face model under a set, the server's exact rotary).

The module imports no torch at load time: ``clients.ruler`` (torch-free) shares the suite, the answer budget
and the records with the offline evaluator, so offline and served numbers mean the same thing. The offline
predictor decodes greedily with a KV cache and one forward per batch of prompts of equal token length; the
set is applied by :class:`factors.evaluation.evaluator.Evaluator` (float64 angles, n̂, mscale), as the server
applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from factors.evaluation.corpus import text_source
from factors.evaluation.tasks import TaskPrompt, clean_haystack, is_correct

if TYPE_CHECKING:
    from factors.evaluation.evaluator import Evaluator
    from factors.schema import FactorSet

PLAIN = "plain"  # --set plain: the model's own RoPE (λ = 1, n̂ = 0, mscale 1, float64 angles)
HAYSTACK_CHARS = 4_000_000  # text read for haystacks: the generator draws windows at seeded offsets in it
BATCH_TOKENS = 16_384  # prompt tokens per forward of the offline predictor (activations stay small)
ANSWER_ROOM = 32  # prompts W − ANSWER_ROOM bytes long leave room in a window of W for the longest compact answer


@dataclass(frozen=True)
class Prediction:
    """One prompt's greedy continuation under one set."""

    set: str
    task: str
    template: str
    length: int
    depth: float
    sample: int  # index of the prompt within its (task, length, depth) cell
    answer: str
    continuation: str
    correct: bool
    prompt_tokens: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def answer_budget(answer: str) -> int:
    """Tokens to generate for an answer: its UTF-8 bytes. Every token covers at least one byte, so this is
    enough for any tokenizer, and exactly the answer for a byte-level model (offline and served alike)."""
    return len(answer.encode("utf-8"))


def load_haystack(spec: str) -> str:
    """The cleaned haystack text of ``FILE`` or ``stdlib:SPLIT`` (or any kind ``corpus.text_source`` reads),
    read the same way offline and served so both build the same prompts."""
    return clean_haystack(text_source(spec, max_chars=HAYSTACK_CHARS))


def sample_indices(prompts: Sequence[TaskPrompt]) -> list[int]:
    """Each prompt's index within its (task, length, depth) cell, in suite order."""
    seen: dict[tuple[str, int, float], int] = {}
    out = []
    for p in prompts:
        key = (p.task, p.length, p.depth)
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out


def predicted(set_name: str, prompt: TaskPrompt, sample: int, continuation: str, prompt_tokens: int) -> Prediction:
    return Prediction(
        set=set_name,
        task=prompt.task,
        template=prompt.template,
        length=prompt.length,
        depth=prompt.depth,
        sample=sample,
        answer=prompt.answer,
        continuation=continuation,
        correct=is_correct(continuation, prompt.answer),
        prompt_tokens=prompt_tokens,
    )


def records(predictions: Iterable[Prediction]) -> list[dict[str, Any]]:
    """One record per (set, task, length, depth), in order of first appearance:
    ``{"set", "task", "template", "length", "depth", "samples", "correct", "accuracy"}``."""
    cells: dict[tuple[str, str, int, float], dict[str, Any]] = {}
    for p in predictions:
        key = (p.set, p.task, p.length, p.depth)
        cell = cells.setdefault(
            key,
            {"set": p.set, "task": p.task, "template": p.template, "length": p.length, "depth": p.depth}
            | {"samples": 0, "correct": 0},
        )
        cell["samples"] += 1
        cell["correct"] += int(p.correct)
    for cell in cells.values():
        cell["accuracy"] = cell["correct"] / cell["samples"]
    return list(cells.values())


def format_table(recs: Sequence[dict[str, Any]]) -> str:
    """Accuracy per set, task and length (rows) and depth (columns), with the row mean."""
    depths = sorted({r["depth"] for r in recs})
    by = {(r["set"], r["task"], r["length"], r["depth"]): r["accuracy"] for r in recs}
    rows = list(dict.fromkeys((r["set"], r["task"], r["length"]) for r in recs))
    width = max([12, *(len(s) for s, _, _ in rows)])
    lines = [f"{'set':<{width}} {'task':<16} {'length':>7} " + " ".join(f"{d:>5.2f}" for d in depths) + "   mean"]
    for s, t, n in rows:
        accs = [by.get((s, t, n, d)) for d in depths]
        cells = " ".join("    -" if a is None else f"{a:>5.2f}" for a in accs)
        got = [a for a in accs if a is not None]
        lines.append(f"{s:<{width}} {t:<16} {n:>7} {cells}  {sum(got) / len(got):>5.3f}")
    return "\n".join(lines)


# -- offline: a Hugging Face model under a set ---------------------------------------------------------


def plain_set(ev: Evaluator) -> FactorSet:
    """The model's own RoPE as a set (λ = 1, mscale 1) named ``plain``: the same float64 angles the server
    applies with an identity set, at any length."""
    return ev.geometry_set("identity", ev.rope.geometry.original_max_len).model_copy(update={"name": PLAIN})


def prompt_ids(ev: Evaluator, text: str) -> list[int]:
    """Token ids as vLLM's completions endpoint makes them: bytes for a byte-level model, else the tokenizer
    with its special tokens (``add_special_tokens`` is vLLM's default)."""
    if ev.tokenizer is None:
        return list(text.encode("utf-8"))
    return list(ev.tokenizer(text)["input_ids"])


def decode(ev: Evaluator, ids: Sequence[int]) -> str:
    """Generated ids as vLLM returns them (special tokens skipped; invalid UTF-8 replaced)."""
    if ev.tokenizer is None:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
    return ev.tokenizer.decode(list(ids), skip_special_tokens=True)


def _eos_ids(ev: Evaluator) -> set[int]:
    eos = getattr(ev.model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def greedy_batch(ev: Evaluator, fs: FactorSet, batch: Sequence[Sequence[int]], steps: int) -> list[list[int]]:
    """Greedy continuations (``steps`` tokens, fewer after EOS) of prompts of one token length, under a set,
    one prefill and ``steps - 1`` cached decode steps."""
    import torch

    length = len(batch[0])
    ev.use(fs, length + steps)
    eos = _eos_ids(ev)
    ids = torch.tensor([list(b) for b in batch], dtype=torch.int64, device=ev.device)
    out: list[list[int]] = [[] for _ in batch]
    done = [False] * len(batch)
    with torch.no_grad():
        step = ev.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        for i in range(steps):
            nxt = step.logits[:, -1].float().argmax(-1)
            for row, tok in enumerate(nxt.tolist()):
                if not done[row]:
                    done[row] = tok in eos
                    if not done[row]:
                        out[row].append(tok)
            if all(done) or i == steps - 1:
                break
            step = ev.model(input_ids=nxt[:, None], past_key_values=step.past_key_values, use_cache=True)
    return out


def predict_offline(
    ev: Evaluator,
    fs: FactorSet,
    prompts: Sequence[TaskPrompt],
    *,
    batch_tokens: int = BATCH_TOKENS,
    on_done: Callable[[int], None] | None = None,
) -> list[Prediction]:
    """Every prompt's greedy continuation of :func:`answer_budget` tokens under ``fs`` (predictions in suite
    order); prompts of one token length share forwards. ``on_done(n)`` is told of each finished batch."""
    samples = sample_indices(prompts)
    tokens = [prompt_ids(ev, p.prompt) for p in prompts]
    budgets = [answer_budget(p.answer) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i in range(len(prompts)):
        groups.setdefault(len(tokens[i]), []).append(i)
    results: dict[int, Prediction] = {}
    for length, members in groups.items():
        per = max(1, batch_tokens // max(1, length))
        for a in range(0, len(members), per):
            chunk = members[a : a + per]
            # greedy steps do not depend on how many follow: each row keeps the first `budget` of the longest
            outs = greedy_batch(ev, fs, [tokens[i] for i in chunk], max(budgets[i] for i in chunk))
            for i, gen in zip(chunk, outs, strict=True):
                results[i] = predicted(fs.name, prompts[i], samples[i], decode(ev, gen[: budgets[i]]), length)
            if on_done:
                on_done(len(chunk))
    return [results[i] for i in range(len(prompts))]


def run_offline(
    ev: Evaluator, sets: Sequence[FactorSet], prompts: Sequence[TaskPrompt], *, progress: bool = True
) -> list[Prediction]:
    """Predictions of every prompt under every set (set after set), with a tqdm bar over all of them."""
    from tqdm import tqdm

    bar = tqdm(total=len(sets) * len(prompts), unit="prompt", disable=not progress, desc="ruler")
    out: list[Prediction] = []
    try:
        for fs in sets:
            bar.set_postfix_str(fs.name)
            out.extend(predict_offline(ev, fs, prompts, on_done=bar.update))
    finally:
        bar.close()
    return out
