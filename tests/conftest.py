"""Shared fixtures: the embedded default model and tiny, deterministic random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (converted once, then reused from the cache)."""
    from server.default_model import ensure_default_model

    return ensure_default_model()
