"""What one fine-tune run does, before any model is touched: its settings (:class:`FinetuneConfig`, with the
learning-rate schedule and the identity a checkpoint must match) and the data of each optimiser step.

Every step draws its windows with a generator seeded by (seed, step), and with mixed context window training
(LongRoPE2) decides per micro-batch, from an RNG seeded the same way, whether it is short (the original RoPE)
or long (the set), and which sequences become task documents: the data of step k depends on nothing else,
which is what makes a resumed run equal the uninterrupted one. The loop itself is :mod:`.finetune`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from factors.evaluation.tasks import TASKS
from factors.schema import FactorSetError
from factors.training.window_guard import WindowGuard

GUARD_FIELDS = ("keep_window", "keep_window_text", "keep_window_samples")


@dataclass(frozen=True)
class FinetuneConfig:
    """Budget of one fine-tune: ``steps`` optimiser steps of ``micro_batch`` × ``grad_accum`` windows of
    ``target_len`` tokens."""

    target_len: int
    steps: int = 200
    micro_batch: int = 1
    grad_accum: int = 8
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    text: str = "stdlib:train"
    checkpoint_every: int = 25
    time_budget_s: float | None = None
    gradient_checkpointing: bool = False  # recompute activations in backward: long windows of real models
    mixed_short: float = 0.0  # fraction of micro-batches trained short (≤ W) under the original RoPE
    short_len: int | None = None  # length of those short sequences (default: the model's window W)
    task_ratio: float = 0.0  # fraction of sequences that are task documents
    tasks: tuple[str, ...] = TASKS
    task_text: str | None = None  # haystack text of the task documents (default: text)
    keep_window: float = 0.0  # after training, blend back toward the source to keep this × its in-window accuracy
    keep_window_text: str = "stdlib:search"  # validation haystack of that guard (never the report's text)
    keep_window_samples: int = 24  # its prompts per task and depth (11 depths)

    @property
    def guard(self) -> WindowGuard:
        """The window guard applied after training (:mod:`.window_guard`; ``keep`` 0: none)."""
        return WindowGuard(keep=self.keep_window, text=self.keep_window_text, samples=self.keep_window_samples)

    @property
    def mixed(self) -> bool:
        """Whether any sequence differs from a plain window under the set (short or task)."""
        return self.mixed_short > 0 or self.task_ratio > 0

    def validate(self) -> None:
        """ValueError when the budget cannot run (checked before any model is loaded)."""
        for name in ("target_len", "steps", "micro_batch", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be within [0, 1] (got {self.min_lr_ratio})")
        for name in ("mixed_short", "task_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1] (got {getattr(self, name)})")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be one or more of {', '.join(TASKS)} (got {list(self.tasks)})")
        if self.short_len is not None and not 1 <= self.short_len <= self.target_len:
            raise ValueError(f"short_len must be within [1, target_len] (got {self.short_len})")
        self.guard.validate()
        if self.keep_window > 0 and self.mixed_short == 0:
            raise ValueError(
                "keep_window needs mixed_short > 0: the guard measures the window under the original RoPE, which"
                " only mixed context window training serves there (a plain fine-tune's window is readjusted)"
            )

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine to min_lr_ratio·lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    # the checkpoint must come from the same run: everything but the time budget, the checkpoint rhythm and the
    # window guard (which runs after the last step, on the trained weights)
    def identity(self) -> dict[str, Any]:
        skip = ("time_budget_s", "checkpoint_every", "gradient_checkpointing", *GUARD_FIELDS)
        out = {k: v for k, v in asdict(self).items() if k not in skip}
        if not self.mixed:  # a plain fine-tune keeps the identity it had before mixed training existed
            for k in ("mixed_short", "short_len", "task_ratio", "tasks", "task_text"):
                out.pop(k)
        else:
            out["tasks"] = list(self.tasks)
        return out


def step_windows(tokens: torch.Tensor, config: FinetuneConfig, step: int) -> torch.Tensor:
    """The ``micro_batch × grad_accum`` windows of ``target_len + 1`` tokens of optimiser step ``step``
    (inputs and their next tokens), drawn with a generator seeded by (seed, step)."""
    n = config.target_len + 1
    if tokens.numel() < n + 1:
        raise FactorSetError(
            f"the training text has {tokens.numel()} tokens; {config.target_len}-token windows need more"
        )
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - n + 1, (config.micro_batch * config.grad_accum,), generator=g)
    return torch.stack([tokens[s : s + n] for s in starts.tolist()])


Batch = tuple[bool, torch.Tensor, int]  # (short, [micro_batch, n + 1] token ids, task documents in it)
DocMaker = Callable[[torch.Tensor, random.Random], torch.Tensor]


def step_batches(
    tokens: torch.Tensor, config: FinetuneConfig, step: int, short_len: int, task_doc: DocMaker | None = None
) -> list[Batch]:
    """The micro-batches of optimiser step ``step``: :func:`step_windows` split by ``micro_batch``; with mixed
    training each micro-batch is short (its windows cut to ``short_len + 1`` tokens) with probability
    ``mixed_short``, and each sequence a task document (``task_doc``) with probability ``task_ratio``, drawn
    from an RNG seeded by (seed, step): the data of step k depends on nothing else."""
    windows = step_windows(tokens, config, step)
    if not config.mixed:
        return [(False, mb, 0) for mb in windows.split(config.micro_batch)]
    rng = random.Random(f"{config.seed}:{step}:mixture")
    out = []
    for mb in windows.split(config.micro_batch):
        short = rng.random() < config.mixed_short
        n = (short_len if short else config.target_len) + 1
        rows, docs = [], 0
        for w in mb[:, :n]:
            if task_doc is not None and rng.random() < config.task_ratio:
                w = task_doc(w, rng)
                docs += 1
            rows.append(w)
        out.append((short, torch.stack(rows), docs))
    return out
