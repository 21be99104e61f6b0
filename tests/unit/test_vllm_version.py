"""server/vllm_ext refuses a vLLM outside the range its internals were written for."""

from __future__ import annotations

import pytest

from server.vllm_ext import SUPPORTED_RANGE, UnsupportedVllmVersion, check_vllm_version


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3", "0.32.0+cpu", "0.32.1rc1"])
def test_supported_versions_pass(version: str) -> None:
    assert check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.31.9", "0.33.0", "1.0.0", "0.33.0rc1", "dev", "0.31.0+cpu"])
def test_other_versions_are_refused_naming_the_range(version: str) -> None:
    with pytest.raises(UnsupportedVllmVersion) as err:
        check_vllm_version(version)
    assert SUPPORTED_RANGE in str(err.value) and f"vLLM {version} is installed" in str(err.value)


def test_installed_vllm_is_supported() -> None:
    import vllm

    assert check_vllm_version() == vllm.__version__


def test_server_refuses_to_start_on_another_version(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import vllm

    from server.app import main

    monkeypatch.setattr(vllm, "__version__", "0.34.1")
    assert main(["--model", "/nonexistent"]) == 2
    message = capsys.readouterr().err
    assert "vLLM 0.34.1 is installed" in message and SUPPORTED_RANGE in message
