"""Hooks into vLLM's V1 model runner (``GPUModelRunner``; the CPU runner subclasses it).

Two hooks, installed once per process by the ``vllm.general_plugins`` entry point (vLLM runs it in the API
process, the engine core and every worker, before the model is built):

- after ``load_model``, the model's rotary modules become :class:`~.rotary.StepRotaryEmbedding` and the
  start-up sets are loaded (:func:`install_into_runner`);
- after ``_prepare_inputs`` has laid out the step (``runner.positions`` holds the scheduled tokens'
  positions), the state fills the rotary buffers for exactly those tokens. Under ngram speculative decoding
  a request's scheduled tokens include its drafts (``num_scheduled_tokens`` counts them, positions run on
  past the last accepted token), so the verification pass gives every drafted token its request's set.

Both are inert unless the engine's ``additional_config`` carries a ``"longrope"`` entry, so stock vLLM in
the same environment (the benchmark's baseline) runs unmodified. Model Runner V2 is not hooked: the engine
pins V1 (``VLLM_USE_V2_MODEL_RUNNER=0``), see docs/engine.md.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .keys import CONFIG_KEY, PATCH_VERSION, SPEC_METHODS
from .rotary import replace_rotaries
from .version import UnsupportedVllmVersion, check_vllm_version
from .worker import LongRopeState

logger = logging.getLogger("vllm.longrope")

_install_lock = threading.Lock()
_installed = False


def longrope_config(vllm_config: Any) -> dict[str, Any] | None:
    extra = getattr(vllm_config, "additional_config", None) or {}
    return extra.get(CONFIG_KEY) if isinstance(extra, dict) else None


def install_into_runner(runner: Any) -> None:
    """Swap the model's rotary modules for step-filled ones and load the configured sets."""
    cfg = longrope_config(runner.vllm_config)
    if cfg is None:
        return
    spec = getattr(runner, "speculative_config", None)
    if spec is not None and spec.method not in SPEC_METHODS:
        # a drafter model would run the shared rotary module on its own token layout: wrong angles
        raise RuntimeError(
            f"per-request LongRoPE does not support speculative method {spec.method!r} (its drafter model shares"
            f" the rotary module); supported: {', '.join(SPEC_METHODS)}"
        )
    rotaries = replace_rotaries(runner.model, runner.max_num_tokens, runner.model_config.dtype, runner.device)
    state = LongRopeState(runner, rotaries)
    runner.longrope_state = state
    if spec is not None:
        _bound_ngram_drafts(runner, state)
    logger.info(
        "per-request LongRoPE installed (patch v%s): %d rotary module(s) of %s, RoPE state %.2f MiB for up to"
        " %d tokens per step, whatever the windows; sets %s",
        PATCH_VERSION,
        len(rotaries),
        type(rotaries[0].inner).__name__,
        state.rope_bytes() / 2**20,
        runner.max_num_tokens,
        sorted(state.slot_of),
    )


def _bound_ngram_drafts(runner: Any, state: LongRopeState) -> None:
    """Wrap this runner's ngram proposer so drafts never run past a request's set window (see
    :meth:`LongRopeState.bound_drafts`). ``NgramProposer.propose(k, sampled, num_tokens_no_spec, token_ids, ...)``
    returns one list of draft ids per request of the input batch, in its order."""
    drafter = runner.drafter
    original = drafter.propose

    def propose(num_speculative_tokens, sampled_token_ids, num_tokens_no_spec, *args, **kwargs):
        drafts = original(num_speculative_tokens, sampled_token_ids, num_tokens_no_spec, *args, **kwargs)
        state.bound_drafts(drafts, num_tokens_no_spec)
        return drafts

    drafter.propose = propose


def install() -> None:
    """Hook the V1 model runners (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        check_vllm_version()
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        runner_classes: list[type] = [GPUModelRunner]
        try:
            from vllm.v1.worker.cpu_model_runner import CPUModelRunner

            runner_classes.append(CPUModelRunner)
        except ImportError:  # CUDA builds may not ship the CPU runner
            pass
        for cls in runner_classes:
            if "load_model" in cls.__dict__:
                _wrap_load_model(cls)
        original_prepare = GPUModelRunner._prepare_inputs

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
            result = original_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
            state = getattr(self, "longrope_state", None)
            if state is not None:
                state.fill(num_scheduled_tokens)
            return result

        GPUModelRunner._prepare_inputs = _prepare_inputs
        _installed = True


def _wrap_load_model(cls: type) -> None:
    original = cls.__dict__["load_model"]

    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        install_into_runner(self)
        return out

    load_model.__wrapped__ = original  # type: ignore[attr-defined]
    cls.load_model = load_model


def register_plugin() -> None:
    """Entry point of the ``vllm.general_plugins`` group. On an unsupported vLLM the hooks stay out (stock
    vLLM keeps working) and ``longrope-serve`` itself refuses to start, naming the supported range."""
    try:
        install()
    except UnsupportedVllmVersion as err:
        logger.error("per-request LongRoPE hooks not installed: %s", err)
