"""LongRoPE factor sets: schema, file formats, rotary math and hand-designed baselines.

Pure torch (transformers optional); never imports vLLM, so it runs on any box with torch.
"""

from .baselines import RopeGeometry, identity_set, make_baseline, ntk_set, pi_set, yarn_set
from .formats import (
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
from .rope import angles, base_inv_freq, cos_sin, cos_sin_table, inv_freq
from .schema import FactorSet, FactorSetError, ModelFingerprint, Provenance, default_mscale, parse_factor_set

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
