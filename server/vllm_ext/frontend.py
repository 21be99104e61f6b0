"""longrope-serve's hooks into vLLM's OpenAI server (vLLM 0.32 and 0.33 names): argument parser, app, launcher, and
admission inside the completion and chat serving classes.

The admission hook wraps the serving objects' ``render_*_request`` methods: once vLLM has tokenised a
request, its prompts go to :mod:`server.admission` (which decides and keeps the admissions) before any
response header is sent; a refusal becomes vLLM's OpenAI-shaped 400.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields
from http import HTTPStatus
from typing import Any

from ..protocol import FACTOR_SET_XARG
from .keys import POLICY_KEY


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return FlexibleArgumentParser(prog=prog, description=description)


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """Every vLLM engine and server option, parsed by vLLM's own parser."""
    from .compat import make_arg_parser  # its module moved in vLLM 0.33

    make_arg_parser(parser)


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM's engine arguments (all but ``model``) from the parsed command line."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_args = AsyncEngineArgs.from_cli_args(args)
    return {f.name: getattr(engine_args, f.name) for f in fields(AsyncEngineArgs) if f.name != "model"}


async def build_openai_app(engine: Any, args: argparse.Namespace) -> tuple[Any, Any, str]:
    """vLLM's own OpenAI app on ``engine`` (chat templates, streaming, logprobs, /v1/models, /health,
    /metrics) and its listening socket: (app, sock, listen address)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import setup_server

    listen_address, sock = setup_server(args, reuse_port=False)
    supported_tasks = await engine.get_supported_tasks()
    app = build_app(args, supported_tasks, engine.model_config)
    await init_app_state(engine, app.state, args, supported_tasks)
    return app, sock, listen_address


async def serve_openai_app(app: Any, sock: Any, args: argparse.Namespace) -> None:
    from vllm.entrypoints.launchers.launcher import serve_http

    shutdown_task = await serve_http(app, sock=sock, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    await shutdown_task


def add_outer_middleware(app: Any, cls: type, **options: Any) -> None:
    """Add an ASGI middleware to vLLM's app. ``build_app`` already built Starlette's middleware stack
    (so ``add_middleware`` refuses); register ours and let Starlette rebuild the stack on first use."""
    from starlette.middleware import Middleware

    app.user_middleware.insert(0, Middleware(cls, **options))
    app.middleware_stack = None


def policy_of(request: Any) -> str | None:
    """The request's ``vllm_xargs: {"longrope_policy": ...}`` (None: the server's default)."""
    xargs = getattr(request, "vllm_xargs", None) or {}
    return xargs.get(POLICY_KEY)


def set_name_of(request: Any) -> Any:
    """The set the request names, ``vllm_xargs: {"longrope_factor_set": NAME}`` (None: automatic routing)."""
    xargs = getattr(request, "vllm_xargs", None) or {}
    return xargs.get(FACTOR_SET_XARG)


AdmitPromptsFn = Callable[[list[Any], "int | None", "str | None", int, Any], None]


def _wrap_render(admit_prompts: AdmitPromptsFn, serving: Any, method: str, inputs_of: Any, requested_of: Any) -> None:
    original = getattr(serving, method)

    async def render(request: Any) -> Any:
        result = await original(request)
        engine_inputs = inputs_of(result)
        if engine_inputs is None:  # vLLM's own error response
            return result
        prompts = [ei["prompt_token_ids"] for ei in engine_inputs if isinstance(ei, dict) and "prompt_token_ids" in ei]
        try:
            n = getattr(request, "n", 1) or 1
            admit_prompts(prompts, requested_of(request), policy_of(request), n, set_name_of(request))
        except ValueError as err:  # RequestTooLong, an unknown named set or a bad per-request policy
            return serving.create_error_response(
                str(err),
                err_type="BadRequestError",
                status_code=HTTPStatus.BAD_REQUEST,
                param=getattr(err, "param", None),
            )
        return result

    setattr(serving, method, render)


def install_admission(state: Any, admit_prompts: AdmitPromptsFn) -> None:
    """Admission around the completion and chat serving objects' render methods: ``admit_prompts(token id
    lists, max_tokens, policy, n, named set)`` admits the request's tokenised prompts or raises ValueError, which is
    answered with OpenAI's 400 before any response header is sent."""
    completion = getattr(state, "openai_serving_completion", None)
    if completion is not None:
        _wrap_render(
            admit_prompts,
            completion,
            "render_completion_request",
            lambda result: result if isinstance(result, list) else None,
            lambda request: request.max_tokens,
        )
    chat = getattr(state, "openai_serving_chat", None)
    if chat is not None:
        _wrap_render(
            admit_prompts,
            chat,
            "render_chat_request",
            lambda result: result[1] if isinstance(result, tuple) else None,
            lambda request: request.max_completion_tokens or request.max_tokens,
        )
