"""Shared fixtures: the embedded default model and tiny, deterministic random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import ROTARY_DIM, write_set

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (converted once, then reused from the cache)."""
    from server.default_model import ensure_default_model

    return ensure_default_model()


PAIRS = ROTARY_DIM // 2


def mid_factors() -> list[float]:
    """Non-uniform λ (n̂ = 0): 1 for the fastest pairs, rising to 4."""
    return [1.0 + 3.0 * (i / (PAIRS - 1)) ** 2 for i in range(PAIRS)]


def nhat_factors() -> list[float]:
    return [1.0 + 7.0 * (i / (PAIRS - 1)) for i in range(PAIRS)]


@pytest.fixture(scope="session")
def tiny_llama(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model)


@pytest.fixture(scope="session")
def set_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sets")
    write_set(folder, "mid", mid_factors(), 1024)
    write_set(folder, "nhat", nhat_factors(), 2048, n_hat=4, mscale=1.25)
    return folder


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the longer variants (e.g. the 3,000-request soak)",
    )
