"""Progressive extension (2× → 4× → 8×, each stage seeded from the last) and the short-window
readjustment: the long and short sets the server switches between.

Fitness is perplexity on fixed windows of a text (same windows for every individual of a stage).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .evaluate import Evaluator
from .schema import FactorSet
from .search import LongRopeSearch, SearchConfig, scaled_seed


def ppl_fitness(
    ev: Evaluator, tokens: torch.Tensor, length: int, samples: int, seed: int
) -> Callable[[FactorSet], float]:
    """Fitness = perplexity of `samples` seeded windows of `length` tokens."""
    windows = ev.windows(tokens, length, samples, seed)
    return lambda fs: ev.perplexity(fs, windows)


def search_set(
    ev: Evaluator,
    tokens: torch.Tensor,
    config: SearchConfig,
    *,
    samples: int,
    data: str,
    name: str,
    window_seed: int = 0,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    extra_seeds: Sequence[tuple[str, Sequence[float], int]] = (),
    progress: bool = True,
    stop_after: int | None = None,
) -> tuple[FactorSet, LongRopeSearch]:
    """One search at config.target_len on `tokens` (the text named by `data`)."""
    prov: dict[str, Any] = {
        "source": str(ev.model_dir),
        "metrics": {"data": data, "samples": samples, "window_seed": window_seed, "lengths": [config.target_len]},
    }
    search = LongRopeSearch(
        ev.rope.geometry,
        ppl_fitness(ev, tokens, config.target_len, samples, window_seed),
        config,
        name=name,
        checkpoint=checkpoint,
        extra_seeds=extra_seeds,
        provenance=prov,
        progress=progress,
    )
    return search.run(resume=resume, stop_after=stop_after), search


def progressive(
    ev: Evaluator,
    tokens: torch.Tensor,
    targets: Sequence[int],
    config: SearchConfig,
    *,
    samples: int,
    data: str,
    name_prefix: str = "longrope",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    window_seed: int = 0,
) -> list[FactorSet]:
    """A chain of searches, one per target length in increasing order; stage k+1 is seeded with
    PI/NTK/YaRN at its length plus stage k's best λ stretched to it."""
    out: list[FactorSet] = []
    for target in sorted(targets):
        extra = [scaled_seed(out[-1], target)] if out else []
        ckpt = Path(checkpoint_dir) / f"{name_prefix}-{target}.ckpt.json" if checkpoint_dir else None
        fs, _ = search_set(
            ev,
            tokens,
            replace(config, target_len=target),
            samples=samples,
            data=data,
            name=f"{name_prefix}-{target}",
            checkpoint=ckpt,
            resume=resume,
            extra_seeds=extra,
            progress=progress,
            window_seed=window_seed,
        )
        out.append(fs)
    return out


def short_readjust(
    ev: Evaluator,
    tokens: torch.Tensor,
    long_set: FactorSet | None,
    config: SearchConfig,
    *,
    samples: int,
    data: str,
    name: str = "longrope-short",
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    window_seed: int = 0,
) -> FactorSet:
    """Search at the original window: seeds are the identity (the model's own in-window ppl) and
    softened versions of the long set's λ (λ^0.5, λ^0.25), so the result never measures worse than
    the model itself on the search windows."""
    original = ev.rope.geometry.original_max_len
    extra: list[tuple[str, list[float], int]] = []
    high = config.high
    if long_set is not None:
        for power in (0.5, 0.25):
            extra.append((f"long^{power}", [f**power for f in long_set.factors], 0))
        high = high or max(2.0, max(long_set.factors))
    cfg = replace(config, target_len=original, seed_methods=("identity",), high=high, mscale=config.mscale or 1.0)
    fs, _ = search_set(
        ev,
        tokens,
        cfg,
        samples=samples,
        data=data,
        name=name,
        checkpoint=checkpoint,
        resume=resume,
        extra_seeds=extra,
        progress=progress,
        window_seed=window_seed,
    )
    return fs
