"""LongRoPE factor sets: schema, file formats, rotary math and hand-designed baselines.

Never imports vLLM. The package exports lazily (PEP 562): ``import factors`` and the torch-free modules
``factors.schema``, ``factors.geometry`` and ``factors.formats`` (what the HTTP clients use) load no torch;
a name that needs it (``cos_sin``, ``yarn_set`` ...) imports its module, and torch, on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what static checkers and IDEs see; at run time these come from __getattr__
    from factors.baselines import identity_set, make_baseline, ntk_set, pi_set, yarn_set
    from factors.formats import (
        ModelRope,
        check_compatible,
        hf_config_from_sets,
        load_any,
        load_json_set,
        model_rope_from_config,
        read_model_rope,
        save_json_set,
        sets_from_hf_config,
    )
    from factors.geometry import RopeGeometry
    from factors.rope import angles, base_inv_freq, cos_sin, cos_sin_table, inv_freq
    from factors.schema import FactorSet, FactorSetError, ModelFingerprint, Provenance, default_mscale, parse_factor_set

# public name -> submodule that defines it (torch only behind baselines and rope)
_EXPORTS = {
    **dict.fromkeys(("identity_set", "make_baseline", "ntk_set", "pi_set", "yarn_set"), "baselines"),
    **dict.fromkeys(
        (
            "ModelRope",
            "check_compatible",
            "hf_config_from_sets",
            "load_any",
            "load_json_set",
            "model_rope_from_config",
            "read_model_rope",
            "save_json_set",
            "sets_from_hf_config",
        ),
        "formats",
    ),
    "RopeGeometry": "geometry",
    **dict.fromkeys(("angles", "base_inv_freq", "cos_sin", "cos_sin_table", "inv_freq"), "rope"),
    **dict.fromkeys(
        ("FactorSet", "FactorSetError", "ModelFingerprint", "Provenance", "default_mscale", "parse_factor_set"),
        "schema",
    ),
}

__all__ = [
    "FactorSet",
    "FactorSetError",
    "ModelFingerprint",
    "ModelRope",
    "Provenance",
    "RopeGeometry",
    "angles",
    "base_inv_freq",
    "check_compatible",
    "cos_sin",
    "cos_sin_table",
    "default_mscale",
    "hf_config_from_sets",
    "identity_set",
    "inv_freq",
    "load_any",
    "load_json_set",
    "make_baseline",
    "model_rope_from_config",
    "ntk_set",
    "parse_factor_set",
    "pi_set",
    "read_model_rope",
    "save_json_set",
    "sets_from_hf_config",
    "yarn_set",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
