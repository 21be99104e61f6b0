"""Building vLLM's ``AsyncLLM`` for a per-request LongRoPE engine, and the output kinds it streams."""

from __future__ import annotations

import os
from typing import Any

from .runner import install
from .version import check_vllm_version


def start_async_llm(model: str, engine_kwargs: dict[str, Any]) -> Any:
    """vLLM's ``AsyncLLM`` with the runner hooks installed (the plugin also installs them in every vLLM
    process) and Model Runner V1 pinned: on CUDA, vLLM 0.32 defaults to Model Runner V2, which these hooks
    do not reach; the V1 runner is the path the CPU tests prove. Spawned engine processes inherit the
    environment."""
    check_vllm_version()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    install()
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    args = AsyncEngineArgs(model=model, **{k: v for k, v in engine_kwargs.items() if v is not None})
    return AsyncLLM.from_engine_args(args)


def output_modes(output_kind: Any) -> tuple[bool, bool]:
    """(delta, final_only) of a ``SamplingParams.output_kind``: how vLLM reports a request's tokens."""
    from vllm.sampling_params import RequestOutputKind

    return output_kind == RequestOutputKind.DELTA, output_kind == RequestOutputKind.FINAL_ONLY


SEED_ON_CPU = (
    "per-request seed is refused on the CPU build: vLLM 0.32's CPU runner rewinds a seeded request's random"
    " generator whenever its prefill is split across steps (chunked prefill, or a busy step), and torch's CPU"
    " generators have no offset, so the engine dies; omit seed (or serve on CUDA)"
)


def check_request_supported(sampling_params: Any) -> None:
    """Refuse, with vLLM's 400, per-request options that this build of vLLM cannot run safely."""
    from vllm.exceptions import VLLMValidationError
    from vllm.platforms import current_platform

    if getattr(sampling_params, "seed", None) is not None and current_platform.is_cpu():
        raise VLLMValidationError(SEED_ON_CPU, parameter="seed", value=sampling_params.seed)


def spec_decode_counts(output: Any) -> tuple[int, int]:
    """(drafted, accepted) draft tokens of a finished ``RequestOutput``, summed over its completions, from
    vLLM's per-request ``spec_decode_metrics`` (present when ``per_request_spec_decode_metrics`` is on)."""
    drafted = accepted = 0
    for completion in getattr(output, "outputs", None) or ():
        stats = getattr(completion, "spec_decode_metrics", None)
        if stats is not None:
            drafted += stats.num_draft_tokens
            accepted += sum(j * count for j, count in enumerate(stats.histogram))
    return drafted, accepted


class EngineWorkers:
    """The engine's workers for the set catalogue: ``collective_rpc`` to the worker extension's methods, which
    reach every rank between steps."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def load(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.engine.collective_rpc("longrope_load_set", args=(data,))

    async def release(self, label: str) -> None:
        await self.engine.collective_rpc("longrope_release_set", args=(label,))

    async def status(self) -> list[dict[str, Any]]:
        return await self.engine.collective_rpc("longrope_status")
