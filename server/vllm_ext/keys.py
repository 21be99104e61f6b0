"""Names shared by the front end and the engine's worker processes (no vLLM, no torch)."""

from __future__ import annotations

from ..protocol import POLICY_XARG

PATCH_VERSION = "2"  # hashed into vLLM's compile-cache key (additional_config) with the rest of CONFIG_KEY
CONFIG_KEY = "longrope"  # additional_config entry that turns per-request LongRoPE on in an engine
EXTRA_ARGS_KEY = "longrope_set"  # SamplingParams.extra_args: the request's set, NAME@VERSION
POLICY_KEY = POLICY_XARG  # per-request policy, in vllm_xargs (= SamplingParams.extra_args)
EXTENSION_QUALNAME = "server.vllm_ext.worker.LongRopeWorkerExtension"
# Speculative methods whose every model pass is the target's own verification pass (laid out by
# ``_prepare_inputs``, so the per-step fill covers drafted tokens): no drafter model runs RoPE.
SPEC_METHODS = ("ngram",)
