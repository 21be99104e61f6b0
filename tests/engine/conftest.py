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
