"""The sets an engine starts with when the model folder carries its own (``longrope-factors finetune`` /
``extend`` output): they are loaded with the model unless factor files are given."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from factors.formats import MODEL_SETS_DIR
from factors.schema import FactorSetError
from server.startup import startup_sets

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "factors" / "data" / "tiny-short"


def _model_with_sets(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(TINY / "model" / "config.json", folder / "config.json")
    (folder / MODEL_SETS_DIR).mkdir()
    for name in names:
        shutil.copy(TINY / "sets" / f"{name}.json", folder / MODEL_SETS_DIR / f"{name}.json")
    return folder


def test_a_model_folder_brings_its_sets(tmp_path: Path) -> None:
    folder = _model_with_sets(tmp_path, "longrope-256", "longrope-512", "longrope-short")
    _, sets = startup_sets(folder)
    assert sorted((fs.name, fs.max_len) for fs in sets) == [
        ("longrope-256", 256),
        ("longrope-512", 512),
        ("longrope-short", 128),
    ]
    # given factor files replace the folder's sets (plain RoPE covers the original window then)
    _, given = startup_sets(folder, [TINY / "sets" / "yarn.json"])
    assert sorted(fs.name for fs in given) == ["original", "yarn"]


def test_a_bad_set_in_the_model_folder_is_refused(tmp_path: Path) -> None:
    folder = _model_with_sets(tmp_path, "longrope-256")
    (folder / MODEL_SETS_DIR / "broken.json").write_text('{"name": "broken"}')
    with pytest.raises(FactorSetError, match="broken"):
        startup_sets(folder)


def test_compile_cache_key_does_not_depend_on_the_sets() -> None:
    """vLLM hashes ``additional_config`` into its compile-cache key; the sets are buffer values, so another
    version of a set (a restart after a hot-load) must not force a new compile — only the patch version may."""
    from server.startup import EngineSettings, plan_engine_args
    from server.vllm_ext.keys import CONFIG_KEY, PATCH_VERSION

    model, sets = startup_sets(str(TINY / "model"), [TINY / "sets" / "yarn.json"])
    _, other = startup_sets(str(TINY / "model"), [TINY / "sets" / "longrope-256.json"])
    settings = EngineSettings(model=str(TINY / "model"))
    first = plan_engine_args(settings, model, sets)["additional_config"]
    second = plan_engine_args(settings, model, other)["additional_config"]
    assert first == second == {CONFIG_KEY: {"patch_version": PATCH_VERSION}}
