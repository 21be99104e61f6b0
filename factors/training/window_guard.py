"""Keep the window after a fine-tune: interpolate the fine-tuned weights back toward the source model's and keep
the largest share of the fine-tune whose in-window task accuracy holds ``keep`` × the source's.

θ(α) = α·θ_tuned + (1 − α)·θ_source, α from 1 down in steps (weight-space ensembling, WiSE-FT: Wortsman et
al., "Robust fine-tuning of zero-shot models", CVPR 2022). Accuracy is RULER-style retrieval in the model's
own window under its own RoPE (:mod:`factors.evaluation.tasks`, compact format, the fine-tune's tasks), with
haystacks from a *validation* text — by default the search split, never the text a report measures on — so α
is chosen on data the result is not judged on.

Why: mixed context window training (LongRoPE2) trains the window under its original angles, but a fine-tune
still forgets some of what the window could do; on the retrieval fixture every learning rate and short share
tried lost multi-value retrieval (0.94 → 0.82–0.86, docs/effective-context.md). Not in LongRoPE2: the paper
keeps its short-context scores with mixed windows alone, at billions of parameters and 10 B tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from factors.evaluation.ruler import ANSWER_ROOM, load_haystack, plain_set, predict_offline
from factors.evaluation.tasks import TASKS, make_suite

logger = logging.getLogger("longrope.window_guard")


@dataclass(frozen=True)
class WindowGuard:
    """Keep ≥ ``keep`` × the source's in-window accuracy (0: off), measured on ``samples`` prompts per task and
    depth (``depths`` depths) of ``text``; α tried from 1 down by ``step`` to ``floor``."""

    keep: float = 0.0
    text: str = "stdlib:search"
    samples: int = 24
    depths: int = 11
    step: float = 0.05
    floor: float = 0.5
    seed: int = 7

    def validate(self) -> None:
        if not 0 <= self.keep <= 1:
            raise ValueError(f"keep_window must be within [0, 1] (got {self.keep})")
        for name in ("samples", "depths"):
            if getattr(self, name) < 1:
                raise ValueError(f"keep_window_{name} must be ≥ 1 (got {getattr(self, name)})")
        if not 0 < self.step <= 1 or not 0 <= self.floor < 1:
            raise ValueError(f"step must be within (0, 1] and floor within [0, 1) (got {self.step}, {self.floor})")

    def alphas(self) -> list[float]:
        """1, 1 − step, … ≥ floor (rounded, so the record reads 0.9, not 0.8999999)."""
        out, k = [], 0
        while (a := round(1 - k * self.step, 6)) >= self.floor - 1e-9:
            out.append(a)
            k += 1
        return out


def in_window_accuracy(ev: Any, prompts: list[Any]) -> tuple[float, dict[str, float]]:
    """Mean over tasks of each task's accuracy under the model's own RoPE (the short tier after mixed windows)."""
    by_task: dict[str, list[bool]] = {}
    for p in predict_offline(ev, plain_set(ev), prompts):
        by_task.setdefault(p.task, []).append(p.correct)
    per = {t: sum(v) / len(v) for t, v in by_task.items()}
    return sum(per.values()) / len(per), per


def guard_prompts(ev: Any, guard: WindowGuard, tasks: tuple[str, ...] = TASKS) -> list[Any]:
    """The guard's prompts: compact format, W − ANSWER_ROOM bytes (as many tokens for a byte-level model, fewer
    under a subword tokenizer), ``guard.depths`` depths × ``guard.samples`` per task, haystack ``guard.text``."""
    length = ev.rope.geometry.original_max_len - ANSWER_ROOM
    if length < 64:
        raise ValueError(f"the model's window ({length + ANSWER_ROOM}) is too short for in-window task prompts")
    return make_suite(tasks, [length], guard.depths, guard.samples, load_haystack(guard.text), guard.seed)


@dataclass(frozen=True)
class SourceWindow:
    """The guard's prompts and the source's accuracy on them (mean over tasks, and each task's)."""

    prompts: list[Any]
    accuracy: float
    tasks: dict[str, float]


def source_accuracy(
    ev: Any, guard: WindowGuard, tasks: tuple[str, ...] = TASKS, prompts: list[Any] | None = None
) -> SourceWindow:
    """The in-window accuracy of ``ev``'s current weights, which must be the source's: measured before any
    training, so that a guard that cannot work fails before the fine-tune, not after it."""
    prompts = guard_prompts(ev, guard, tasks) if prompts is None else prompts
    acc, per = in_window_accuracy(ev, prompts)
    if acc == 0:
        raise ValueError(
            f"{ev.model_dir} retrieves none of {len(prompts)} in-window task prompts (compact format): the window"
            " guard has nothing to keep; fine-tune without --keep-window"
        )
    return SourceWindow(prompts, acc, per)


def _blend(model: Any, tuned: dict[str, torch.Tensor], source: dict[str, torch.Tensor], alpha: float) -> None:
    """Both copies stay on the CPU; each blended tensor goes to the parameter's device as it is written."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((alpha * tuned[name].float() + (1 - alpha) * source[name].float()).to(p.dtype))


def keep_window(
    ev: Any, guard: WindowGuard, tasks: tuple[str, ...] = TASKS, source: SourceWindow | None = None
) -> dict[str, Any]:
    """Blend ``ev.model`` (fine-tuned in place from ``ev.model_dir``) back toward the source until the window
    keeps ``guard.keep`` × the source's accuracy (``source``, measured before training by
    :func:`source_accuracy`; measured here on the source's weights if not given); leave the chosen weights in
    the model; return the record.

    The largest α that meets the target wins; if none down to ``floor`` does, the most accurate one tried
    (the record says ``met: false`` and a warning is logged)."""
    from transformers import AutoModelForCausalLM

    t0 = time.monotonic()
    prompts = guard_prompts(ev, guard, tasks) if source is None else source.prompts
    model = ev.model
    tuned = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    source_model = AutoModelForCausalLM.from_pretrained(ev.model_dir, dtype=ev.dtype)  # on the CPU
    weights = {n: p.detach() for n, p in source_model.named_parameters()}
    if tuned.keys() != weights.keys():
        raise ValueError(f"the fine-tuned model's parameters differ from {ev.model_dir}'s; nothing to blend")
    if source is None:
        _blend(model, tuned, weights, 0.0)
        try:
            source = source_accuracy(ev, guard, tasks, prompts)
        except ValueError:
            _blend(model, tuned, weights, 1.0)
            raise
    base, base_per = source.accuracy, source.tasks
    target = guard.keep * base
    tried: list[dict[str, Any]] = []
    chosen = None
    for alpha in guard.alphas():
        _blend(model, tuned, weights, alpha)
        acc, per = in_window_accuracy(ev, prompts)
        tried.append({"alpha": alpha, "accuracy": round(acc, 6), "tasks": {t: round(v, 6) for t, v in per.items()}})
        logger.info("window guard: α %.2f keeps %.4f in the window (target %.4f)", alpha, acc, target)
        if acc >= target:
            chosen = tried[-1]
            break
    met = chosen is not None
    if chosen is None:
        chosen = max(tried, key=lambda r: (r["accuracy"], r["alpha"]))
        logger.warning(
            "window guard: no α down to %.2f keeps %.2f × the source's in-window accuracy (%.4f); best α %.2f (%.4f)",
            guard.floor,
            guard.keep,
            base,
            chosen["alpha"],
            chosen["accuracy"],
        )
    _blend(model, tuned, weights, chosen["alpha"])
    ev.forget_measurements()
    return {
        "keep": guard.keep,
        "text": guard.text,
        "tasks": list(tasks),
        "length": prompts[0].length,
        "prompts": len(prompts),
        "seed": guard.seed,
        "source_accuracy": round(base, 6),
        "source_tasks": {t: round(v, 6) for t, v in base_per.items()},
        "target": round(target, 6),
        "tried": tried,
        "alpha": chosen["alpha"],
        "accuracy": chosen["accuracy"],
        "met": met,
        "seconds": round(time.monotonic() - t0, 1),
        "method": "θ = α·θ_tuned + (1 − α)·θ_source (WiSE-FT); the largest α that keeps the target",
    }
