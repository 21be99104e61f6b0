"""What an engine starts with: its factor sets (model config, files, registry) and the vLLM engine arguments
they need (window, plugin config, worker extension)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
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
from .vllm_ext.keys import SPEC_METHODS

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
    check_engine_options(kwargs)
    if speculative_method(kwargs) is not None and kwargs.get("per_request_spec_decode_metrics", "none") == "none":
        # per-request acceptance counts feed longrope_spec_decode_*_tokens_total{factor_set}
        kwargs["per_request_spec_decode_metrics"] = "summary"
    extra = dict(kwargs.get("additional_config") or {})
    # Only what changes the compiled graph goes into vLLM's compile-cache key (additional_config is hashed):
    # the patch version. The sets are parameters in buffers, given to the workers once the engine is up
    # (LongRopeEngine.start), so a restart after a hot-load reuses the compiled artifacts.
    extra[CONFIG_KEY] = {"patch_version": PATCH_VERSION}
    kwargs["additional_config"] = extra
    kwargs["worker_extension_cls"] = settings.worker_extension
    kwargs.setdefault("served_model_name", None)
    return kwargs


# -- vLLM options checked at start: every option is either shown to work with per-request sets (docs/engine.md,
# tests/engine/test_feature_matrix.py) or refused here with why and what to use instead.


class UnsupportedOption(ValueError):
    """vLLM options that per-request LongRoPE refuses at start (the message names each, why, and the way out)."""


def speculative_method(kwargs: Mapping[str, Any]) -> str | None:
    """The speculative method these engine arguments ask for, resolved as vLLM 0.32 resolves it
    (``SpeculativeConfig.__post_init__``): ``--spec-method`` / ``--speculative-config.method``, else
    ``model`` "ngram" → ngram, a dotted class path → custom_class, any other model → draft_model."""
    spec = kwargs.get("speculative_config")
    cfg: dict[str, Any] = dict(spec) if isinstance(spec, Mapping) else {}
    if spec is not None and not isinstance(spec, Mapping):  # a SpeculativeConfig object given in code
        cfg = {"method": getattr(spec, "method", None), "model": getattr(spec, "model", None)}
    cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
    method = kwargs.get("spec_method") or cfg.get("method")
    model = kwargs.get("spec_model") or cfg.get("model")
    if spec is None and method is None and model is None and kwargs.get("spec_tokens") is None:
        return None
    if method in (None, ""):
        if model in ("ngram", "[ngram]"):
            return "ngram"
        dotted = isinstance(model, str) and "/" not in model and len(model.split(".")) >= 2
        if dotted and all(part.isidentifier() for part in model.split(".")):
            return "custom_class"
        return "draft_model"
    return "ngram" if method == "[ngram]" else str(method)


def _field(value: Any, name: str) -> Any:
    return value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)


def _refused_spec(kwargs: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    method = speculative_method(kwargs)
    return None if method is None or method in SPEC_METHODS else f"method {method!r}"


def _mrv2_env(kwargs: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    value = environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower()
    return f"={value}" if value in ("1", "true", "yes", "on") else None


UNQUANTIZED_KV = ("auto", "bfloat16", "float16", "half", "float32", "float")


def _quantized_kv(kwargs: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    value = kwargs.get("kv_cache_dtype")
    return None if value in (None, *UNQUANTIZED_KV) else str(value)


def _set(name: str, nested: str | None = None) -> Callable[[Mapping[str, Any], Mapping[str, str]], str | None]:
    def given(kwargs: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
        value = kwargs.get(name)
        if nested is not None and value is not None:
            value = _field(value, nested)
        return None if value in (None, {}, False) else repr(value)

    return given


def _above_one(name: str) -> Callable[[Mapping[str, Any], Mapping[str, str]], str | None]:
    def given(kwargs: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
        value = kwargs.get(name)
        return None if value in (None, 0, 1) else str(value)

    return given


@dataclass(frozen=True)
class Refusal:
    """One refused vLLM option: ``given`` returns the offending value (None: not used)."""

    option: str
    given: Callable[[Mapping[str, Any], Mapping[str, str]], str | None]
    reason: str
    instead: str


MRV2 = "it forces vLLM's Model Runner V2, which per-request LongRoPE does not hook (and which needs Triton)"
SPEC_INSTEAD = (
    f'use --speculative-config \'{{"method": "ngram", "num_speculative_tokens": 4}}\' ({", ".join(SPEC_METHODS)})'
)

REFUSED: tuple[Refusal, ...] = (
    Refusal(
        "--speculative-config / --spec-method",
        _refused_spec,
        "a drafter model (draft_model, EAGLE, MTP, Medusa, ...) runs RoPE through the target's rotary module on its"
        " own token layout, so its drafts would get wrong angles; suffix needs arctic-inference (source-only,"
        " not installed); ngram_gpu and custom proposers are not verified",
        SPEC_INSTEAD,
    ),
    Refusal("--watermark-config", _set("watermark_config"), MRV2, "drop the option"),
    Refusal("--attention-config.hisparse_config", _set("attention_config", "hisparse_config"), MRV2, "drop it"),
    Refusal("VLLM_USE_V2_MODEL_RUNNER", _mrv2_env, MRV2, "unset it (longrope-serve pins Model Runner V1)"),
    Refusal(
        "--data-parallel-size",
        _above_one("data_parallel_size"),
        "each data-parallel engine core would need every hot-loaded set and its admission counts; not verified",
        "run several longrope-serve replicas sharing one --registry (docs/deploy.md), or --tensor-parallel-size",
    ),
    Refusal(
        "--pipeline-parallel-size",
        _above_one("pipeline_parallel_size"),
        "not verified with per-request sets (tensor parallel is: tests/engine/test_parallel.py)",
        "use --tensor-parallel-size",
    ),
    Refusal(
        "--enable-sleep-mode",
        _set("enable_sleep_mode"),
        "the CPU build has no sleep mode and level 2 would discard the per-set parameters held beside the weights",
        "drop the option",
    ),
    Refusal(
        "--kv-cache-dtype",
        _quantized_kv,
        "a quantized KV cache is not verified with per-request sets: on this CPU fp8 runs, but its rounding"
        " (mean |Δ prompt logprob| 0.06 on the tiny model) is as large as the difference between sets, so no test"
        " here can show each request on its own set",
        "leave it at auto (the model dtype)",
    ),
    Refusal(
        "--enable-lora",
        _set("enable_lora"),
        "LoRA adapters are not verified with per-request sets (no test of an adapter's outputs against a reference)",
        "merge the adapter into the model's weights and serve that folder",
    ),
    Refusal(
        "--kv-transfer-config",
        _set("kv_transfer_config"),
        "KV computed by another instance carries no factor set, so a request could resume on another set's cache",
        "drop the option",
    ),
)


def check_engine_options(kwargs: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> None:
    """Refuse, in one message, every vLLM option of :data:`REFUSED` these engine arguments use."""
    environ = os.environ if environ is None else environ
    problems = []
    for refusal in REFUSED:
        shown = refusal.given(kwargs, environ)
        if shown is not None:
            problems.append(f"{refusal.option} {shown}: {refusal.reason}; {refusal.instead}")
    if problems:
        raise UnsupportedOption("per-request LongRoPE cannot run with " + "\n  ".join(problems))
