"""Session-scoped real engines (vLLM CPU build) on tiny random models."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from engine_harness import ENGINE_KWARGS, LoopThread  # noqa: E402
from tiny_models import make_tiny_llama  # noqa: E402

ROTARY_DIM = 64
PAIRS = ROTARY_DIM // 2


def mid_factors() -> list[float]:
    """Non-uniform λ (n̂ = 0): 1 for the fastest pairs, rising to 4."""
    return [1.0 + 3.0 * (i / (PAIRS - 1)) ** 2 for i in range(PAIRS)]


def nhat_factors() -> list[float]:
    return [1.0 + 7.0 * (i / (PAIRS - 1)) for i in range(PAIRS)]


def write_set(folder: Path, name: str, factors: list[float], max_len: int, **extra: object) -> Path:
    path = folder / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "name": name,
                "factors": factors,
                "rope_theta": 10000.0,
                "rotary_dim": ROTARY_DIM,
                "original_max_len": 256,
                "max_len": max_len,
                **extra,
            }
        )
    )
    return path


@pytest.fixture(scope="session")
def tiny_llama(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model)


@pytest.fixture(scope="session")
def set_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sets")
    write_set(folder, "mid", mid_factors(), 1024)
    write_set(folder, "nhat", nhat_factors(), 2048, n_hat=4, mscale=1.25)
    return folder


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
