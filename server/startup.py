"""What an engine starts with: its factor sets (model config, files, registry) and the vLLM engine arguments
they need (window, plugin config, worker extension)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factors.baselines import identity_set
from factors.formats import (
    ModelRope,
    check_compatible,
    load_set_paths,
    model_rope_from_config,
    model_set_files,
    sets_from_hf_config,
)
from factors.schema import FactorSet, FactorSetError

from .policy import DEFAULT_POLICY, Policy
from .vllm_ext import CONFIG_KEY, EXTENSION_QUALNAME, PATCH_VERSION

logger = logging.getLogger("longrope.engine")


def startup_sets(model_dir: str | Path, factor_paths: Iterable[str | Path] = ()) -> tuple[ModelRope, list[FactorSet]]:
    """The sets an engine starts with: the model's own ``longrope`` config (short + long), the sets the model
    folder carries (``longrope-sets/``, written by ``longrope-factors finetune`` / ``extend``) unless factor
    files are given, the given factor files, and plain RoPE over the original window when no set's window
    is that short."""
    config_path = Path(model_dir) / "config.json"
    cfg = json.loads(config_path.read_text())
    model = model_rope_from_config(cfg)
    sets: list[FactorSet] = []
    if model.rope_type in ("longrope", "su"):
        sets.extend(sets_from_hf_config(cfg, source=str(config_path)))
    factor_paths = list(factor_paths)
    if not factor_paths:
        factor_paths = model_set_files(model_dir)
        if factor_paths:
            logger.info("sets from the model folder: %s", ", ".join(p.name for p in factor_paths))
    for fs in load_set_paths(factor_paths):
        check_compatible(fs, model)
        sets.append(fs)
    if not any(fs.max_len <= model.geometry.original_max_len for fs in sets):
        sets.append(identity_set(model.geometry, "original"))
    names = Counter(fs.name for fs in sets)
    dupes = [n for n, c in names.items() if c > 1]
    if dupes:
        raise FactorSetError(f"several start-up sets are named {dupes}; give each set a distinct name")
    return model, [fs if fs.version is not None else fs.with_updates(version=1) for fs in sets]


@dataclass
class EngineSettings:
    """What the engine needs beyond vLLM's own arguments."""

    model: str
    factor_paths: list[str] = field(default_factory=list)
    default_reserve: int = 256
    policy: Policy = DEFAULT_POLICY
    registry_dir: str | None = None  # where loaded sets persist across restarts (None: memory only)
    # vLLM's worker_extension_cls: ours, or a subclass of it (qualified name) that adds worker methods
    worker_extension: str = EXTENSION_QUALNAME
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to vLLM's AsyncEngineArgs


def plan_engine_args(settings: EngineSettings, model: ModelRope, sets: list[FactorSet]) -> dict[str, Any]:
    """vLLM engine arguments for these sets: window, plugin config, extension."""
    kwargs = dict(settings.engine_kwargs)
    largest = max(fs.max_len for fs in sets)
    requested = kwargs.get("max_model_len")
    if requested is not None and requested < largest:
        too_big = [fs.label for fs in sets if fs.max_len > requested]
        raise FactorSetError(
            f"--max-model-len {requested} is smaller than the window of {too_big}; raise it to {largest}"
            " or leave it unset (the engine then serves the largest set window)"
        )
    kwargs["max_model_len"] = requested or largest
    if kwargs["max_model_len"] > model.max_position_embeddings:
        # vLLM caps max_model_len at the config's max_position_embeddings; the factor sets are what make
        # the longer window valid, so raise exactly that field for this model (not a global override).
        overrides = dict(kwargs.get("hf_overrides") or {})
        overrides["max_position_embeddings"] = kwargs["max_model_len"]
        kwargs["hf_overrides"] = overrides
        logger.info(
            "model config max_position_embeddings %d < largest set window %d: overriding it for this engine",
            model.max_position_embeddings,
            kwargs["max_model_len"],
        )
    if kwargs.get("speculative_config"):
        raise FactorSetError("speculative decoding is not supported with per-request LongRoPE")
    extra = dict(kwargs.get("additional_config") or {})
    extra[CONFIG_KEY] = {
        "patch_version": PATCH_VERSION,
        "sets": [fs.model_dump(mode="json") for fs in sets],
    }
    kwargs["additional_config"] = extra
    kwargs["worker_extension_cls"] = settings.worker_extension
    kwargs.setdefault("served_model_name", None)
    return kwargs
