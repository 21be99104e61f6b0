"""The factor-set registry on disk: versions, live pointer with routing, restore at start, corrupt files skipped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from factors import parse_factor_set
from factors.schema import FactorSetError
from server.registry import Registry, RegistryState


def fs(name: str, factor: float = 2.0, **extra: object):
    return parse_factor_set(
        {
            "name": name,
            "factors": [1.0, factor],
            "rope_theta": 10000.0,
            "rotary_dim": 4,
            "original_max_len": 128,
            "max_len": 512,
            **extra,
        }
    )


def test_restore_saves_startup_sets_as_version_one(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    live = reg.restore([fs("a"), fs("b")])
    assert sorted(s.label for s in live) == ["a@1", "b@1"]
    assert json.loads((tmp_path / "live.json").read_text()) == {"live": {"a": 1, "b": 1}, "retired": [], "explicit": []}
    assert reg.load_version("a", 1).factors == [1.0, 2.0]


def test_registry_wins_over_startup_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry(tmp_path)
    reg.restore([fs("a")])
    reg.save_version(fs("a", 3.0, version=2))
    reg.write_state(RegistryState({"a": 2}, ["gone"]))
    with caplog.at_level(logging.WARNING):
        live = reg.restore([fs("a"), fs("gone"), fs("new")])
    assert sorted(s.label for s in live) == ["a@2", "new@1"]  # retired names stay retired
    assert "differs from the registry's live a@2" in caplog.text


def test_corrupt_version_is_skipped_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry(tmp_path)
    reg.restore([fs("a"), fs("b")])
    reg.version_path("b", 1).write_text("{ half a file")
    with caplog.at_level(logging.ERROR):
        live = reg.restore([])
    assert [s.label for s in live] == ["a@1"]
    assert "REGISTRY: skipping b@1" in caplog.text and "not valid JSON" in caplog.text


def test_unreadable_live_file_falls_back_to_startup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry(tmp_path)
    (tmp_path / "live.json").write_text("not json")
    with caplog.at_level(logging.ERROR):
        live = reg.restore([fs("a")])
    assert [s.label for s in live] == ["a@1"] and "live.json is unreadable" in caplog.text


def test_routing_is_restored_and_kept_to_live_names(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.restore([fs("a"), fs("b")])
    reg.write_state(RegistryState({"a": 1, "b": 1}, [], ["b", "gone"]))
    assert reg.read_state().explicit == ["b"]  # only live names are written
    reg.restore([fs("a"), fs("b"), fs("c")])
    assert reg.read_state().explicit == ["b"]
    (tmp_path / "live.json").write_text(json.dumps({"live": {"a": 1}, "retired": []}))  # written before routing
    reg.restore([])
    assert reg.read_state() == RegistryState({"a": 1}, [], [])


def test_a_registry_leaving_no_auto_set_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.restore([fs("a"), fs("b")])
    reg.write_state(RegistryState({"a": 1, "b": 1}, [], ["a", "b"]))
    with pytest.raises(FactorSetError, match="leaves no set for automatic routing: every live set"):
        reg.restore([fs("a")])
    assert [s.label for s in reg.restore([fs("a"), fs("new")])] == ["a@1", "b@1", "new@1"]  # a new auto name


def test_a_bad_routing_name_is_a_damaged_pointer(tmp_path: Path) -> None:
    (tmp_path / "live.json").write_text(json.dumps({"live": {"a": 1}, "explicit": ["../x"]}))
    with pytest.raises(FactorSetError, match="names invalid sets or versions"):
        Registry(tmp_path).read_state_strict()
