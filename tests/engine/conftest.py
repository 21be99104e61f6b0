"""Session-scoped real engines (vLLM CPU build) on tiny random models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from engine_harness import ENGINE_KWARGS, LoopThread  # noqa: E402


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture(scope="session")
def engine(loop: LoopThread, tiny_llama: Path, set_files: Path) -> Iterator[object]:
    from server.engine import EngineSettings, LongRopeEngine

    settings = EngineSettings(
        model=str(tiny_llama), factor_paths=[str(set_files)], default_reserve=16, engine_kwargs=dict(ENGINE_KWARGS)
    )
    eng = loop.run(LongRopeEngine.start(settings))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def phi3_model(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Phi-3-style model with a ``longrope`` config: short window 128, long window 1024."""
    from tiny_models import make_tiny_phi3

    return make_tiny_phi3(
        tmp_path_factory.mktemp("tiny-phi3"), default_model, original=128, max_position_embeddings=1024
    )


@pytest.fixture(scope="session")
def phi3_engine(loop: LoopThread, phi3_model: Path) -> Iterator[object]:
    """The Phi-3 model's own short and long sets, default policy (upgrade)."""
    from server.engine import EngineSettings, LongRopeEngine

    settings = EngineSettings(model=str(phi3_model), default_reserve=8, engine_kwargs=dict(ENGINE_KWARGS))
    eng = loop.run(LongRopeEngine.start(settings))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def hf_phi3(phi3_model: Path) -> object:
    """Hugging Face transformers' own Phi-3 on the same folder: the reference (fp32, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(phi3_model), dtype=torch.float32, attn_implementation="eager"
    ).eval()
