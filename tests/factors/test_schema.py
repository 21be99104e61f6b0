"""The FactorSet schema, its file formats and every bad input's message."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from factors import FactorSet, FactorSetError, RopeGeometry, check_compatible, load_any, parse_factor_set
from factors.formats import (
    csv_factor_set,
    factor_set_json,
    hf_config_from_sets,
    load_json_set,
    longrope_csv,
    model_rope_from_config,
    parse_longrope_csv,
    sets_from_hf_config,
)

MINIMAL = {
    "name": "long-16k",
    "factors": [1.0, 1.5, 2.0, 4.0],
    "rope_theta": 10000.0,
    "rotary_dim": 8,
    "original_max_len": 4096,
    "max_len": 16384,
}


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(MINIMAL))
    fs = load_json_set(path)
    assert fs.n_hat == 0
    assert math.isclose(fs.resolved_mscale, math.sqrt(1 + math.log(4) / math.log(4096)))
    assert fs.provenance.method == "manual" and fs.version is None and fs.schema_version == 1
    # not extended: mscale 1
    short = parse_factor_set({**MINIMAL, "max_len": 4096})
    assert short.resolved_mscale == 1.0
    # round trip keeps everything, with explicit mscale
    again = parse_factor_set(json.loads(factor_set_json(fs)))
    assert again == fs and json.loads(factor_set_json(fs))["mscale"] == fs.resolved_mscale


BAD_CASES = [
    ({"factors": [1.0, 2.0, 3.0]}, "factors: expected 4 values (rotary_dim/2 for rotary_dim=8), got 3"),
    ({"factors": [1.0, float("nan"), 2.0, 3.0]}, "every λ_i must be finite; factors[1] is nan"),
    ({"factors": [1.0, 2.0, float("inf"), 3.0]}, "every λ_i must be finite; factors[2] is inf"),
    ({"factors": [1.0, 0.5, 2.0, 3.0]}, "every λ_i must be ≥ 1 (interpolation); factors[1] is 0.5"),
    ({"factors": [1.0, 0.0, 2.0, 3.0]}, "every λ_i must be > 0; factors[1] is 0.0"),
    ({"factors": [1.0, -2.0, 2.0, 3.0], "allow_factors_below_one": True}, "every λ_i must be > 0; factors[1] is -2.0"),
    ({"n_hat": -1}, "n_hat: Input should be greater than or equal to 0"),
    ({"n_hat": 16384}, "n_hat: must be < max_len (16384), got 16384"),
    ({"rotary_dim": 7}, "rotary_dim: must be even"),
    ({"rope_theta": 0}, "rope_theta: Input should be greater than 0"),
    ({"mscale": -1.0}, "mscale: must be a finite number > 0, got -1.0"),
    ({"max_len": 0}, "max_len: Input should be greater than or equal to 1"),
    ({"name": "bad name!"}, "name: must be 1-64 characters of letters, digits"),
    ({"colour": "blue"}, "colour: unknown field"),
    ({"schema_version": 2}, "unsupported schema_version 2; this longrope-serve reads 1"),
]


@pytest.mark.parametrize("change,message", BAD_CASES, ids=[m[:40] for _, m in BAD_CASES])
def test_bad_input_message(change: dict, message: str) -> None:
    with pytest.raises(FactorSetError) as err:
        parse_factor_set({**MINIMAL, **change})
    assert message in str(err.value)


def test_missing_field_named() -> None:
    data = dict(MINIMAL)
    del data["rope_theta"]
    with pytest.raises(FactorSetError, match="rope_theta: required field is missing"):
        parse_factor_set(data)


def test_not_an_object() -> None:
    with pytest.raises(FactorSetError, match="expected a JSON object, got list"):
        parse_factor_set([1, 2])


def test_below_one_allowed_when_asked() -> None:
    fs = parse_factor_set({**MINIMAL, "factors": [0.9, 1.0, 2.0, 3.0], "allow_factors_below_one": True})
    assert fs.factors[0] == 0.9


def test_non_monotone_warns_or_rejects(caplog: pytest.LogCaptureFixture) -> None:
    data = {**MINIMAL, "factors": [1.0, 3.0, 2.0, 4.0]}
    with caplog.at_level(logging.WARNING):
        parse_factor_set(data)
    assert "non-decreasing" in caplog.text and "factors[2]=2.0 < factors[1]=3.0" in caplog.text
    with pytest.raises(FactorSetError, match="factors\\[2\\]=2.0 < factors\\[1\\]=3.0"):
        parse_factor_set(data, monotone="reject")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FactorSetError, match="cannot read factor file .*missing.json: No such file"):
        load_json_set(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FactorSetError, match="bad.json is not valid JSON"):
        load_json_set(bad)
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(FactorSetError, match="is not valid JSON"):
        load_json_set(empty)


MODEL_CFG = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
}


def test_fingerprint_mismatch_names_fields() -> None:
    model = model_rope_from_config(MODEL_CFG)  # head_dim 8 → rotary_dim 8
    ok = parse_factor_set({**MINIMAL, "model": {"model_type": "llama", "hidden_size": 32}})
    check_compatible(ok, model)
    with pytest.raises(FactorSetError) as err:
        check_compatible(parse_factor_set({**MINIMAL, "rope_theta": 500000.0}), model)
    assert "rope_theta: the set has 500000, the model's base is 10000" in str(err.value)
    with pytest.raises(FactorSetError, match="rotary_dim: the set has 16, the model rotates 8 dims"):
        check_compatible(parse_factor_set({**MINIMAL, "rotary_dim": 16, "factors": [1.0] * 8}), model)
    with pytest.raises(FactorSetError, match="original_max_len: the set has 2048, the model was pretrained on 4096"):
        check_compatible(parse_factor_set({**MINIMAL, "original_max_len": 2048}), model)
    with pytest.raises(FactorSetError, match="model.hidden_size: the set was made for 64, the model has 32"):
        check_compatible(parse_factor_set({**MINIMAL, "model": {"hidden_size": 64}}), model)


# -- CSV -------------------------------------------------------------------------------------------

GEO = RopeGeometry(10000.0, 8, 4096)


def test_csv_row_repeated_rows_and_column() -> None:
    assert parse_longrope_csv("1.0,1.5,2.0,4.0\n") == [1.0, 1.5, 2.0, 4.0]
    assert parse_longrope_csv("1.0,1.5,2.0,4.0\n1.0,1.5,2.0,4.0\n") == [1.0, 1.5, 2.0, 4.0]
    assert parse_longrope_csv("1.0\n1.5\n2.0\n4.0\n") == [1.0, 1.5, 2.0, 4.0]


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "no factors found"),
        ("1.0,abc,2.0,3.0\n", "every cell must be a number"),
        ("1,2,3,4\n1,2,3,5\n", "row 2 differs from row 1; per-layer factors are not supported"),
    ],
)
def test_bad_csv(text: str, message: str) -> None:
    with pytest.raises(FactorSetError, match=message):
        parse_longrope_csv(text)


def test_csv_round_trip() -> None:
    fs = csv_factor_set("1.0,1.5,2.0,4.0", name="c", geometry=GEO, max_len=16384, n_hat=4)
    assert fs.factors == [1.0, 1.5, 2.0, 4.0] and fs.n_hat == 4 and fs.provenance.method == "csv"
    assert parse_longrope_csv(longrope_csv(fs)) == fs.factors
    with pytest.raises(FactorSetError, match="expected 4 values"):
        csv_factor_set("1.0,1.5,2.0", name="c", geometry=GEO, max_len=16384)


def test_csv_needs_geometry(tmp_path: Path) -> None:
    p = tmp_path / "f.csv"
    p.write_text("1,2,3,4\n")
    with pytest.raises(FactorSetError, match="a LongRoPE CSV holds only λ_i"):
        load_any(p)
    (fs,) = load_any(p, geometry=GEO, max_len=8192)
    assert fs.name == "f" and fs.max_len == 8192


# -- Hugging Face ------------------------------------------------------------------------------------

PHI3 = {
    "model_type": "phi3",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
        "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 32.0],
    },
}


def test_hf_import_old_phi3_shape_and_export_round_trip() -> None:
    short, long = sets_from_hf_config(PHI3)
    assert (short.name, short.max_len, long.name, long.max_len) == ("short", 4096, "long", 131072)
    expected = math.sqrt(1 + math.log(32) / math.log(4096))
    assert math.isclose(short.resolved_mscale, expected) and math.isclose(long.resolved_mscale, expected)
    out = hf_config_from_sets(short, long, key="rope_scaling")
    assert out["max_position_embeddings"] == 131072
    assert out["rope_scaling"]["attention_factor"] == pytest.approx(expected)
    s2, l2 = sets_from_hf_config({**PHI3, **out})
    assert s2.factors == short.factors and l2.factors == long.factors
    assert s2.resolved_mscale == short.resolved_mscale


def test_hf_short_long_mscale() -> None:
    cfg = {**PHI3, "rope_scaling": {**PHI3["rope_scaling"], "short_mscale": 1.0, "long_mscale": 1.25}}
    short, long = sets_from_hf_config(cfg)
    assert short.resolved_mscale == 1.0 and long.resolved_mscale == 1.25
    out = hf_config_from_sets(short, long)
    assert out["rope_parameters"]["short_mscale"] == 1.0 and out["rope_parameters"]["long_mscale"] == 1.25


def test_hf_bad_inputs() -> None:
    with pytest.raises(FactorSetError, match="rope type is 'yarn'; expected 'longrope'"):
        sets_from_hf_config({**PHI3, "rope_scaling": {"type": "yarn", "factor": 4}})
    with pytest.raises(FactorSetError, match="long_factor is missing"):
        sets_from_hf_config({**PHI3, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8}})
    with pytest.raises(FactorSetError, match="HF config long_factor: factors: expected 8 values"):
        sets_from_hf_config({**PHI3, "rope_scaling": {**PHI3["rope_scaling"], "long_factor": [1.0] * 7}})
    with pytest.raises(FactorSetError, match="bare longrope block"):
        sets_from_hf_config(PHI3["rope_scaling"])
    short, long = sets_from_hf_config(PHI3)
    with pytest.raises(FactorSetError, match="Hugging Face's longrope has no n̂"):
        hf_config_from_sets(short, long.with_updates(n_hat=4))


def test_factor_set_is_immutable() -> None:
    fs = parse_factor_set(MINIMAL)
    with pytest.raises(ValidationError):
        fs.name = "other"  # type: ignore[misc]
    assert isinstance(fs, FactorSet)
