"""``longrope-serve``: vLLM's OpenAI-compatible server around the per-request LongRoPE engine.

vLLM's own app is reused as it is (``build_app`` + ``init_app_state``: chat templates, streaming,
logprobs, usage, ``/v1/models``, ``/health``, ``/metrics``); two things are added:

- the completion and chat serving objects' ``render_*_request`` methods are wrapped so that, once a
  prompt is tokenised, the request is admitted to a factor set (and refused with an OpenAI-shaped 400
  when no window holds it) before any response header is sent;
- an ASGI middleware adds ``x-longrope-factor-set: NAME@VERSION`` to the response, streamed or not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import logging
import os
import sys
from http import HTTPStatus
from pathlib import Path
from typing import Any

from factors.schema import FactorSetError

from .engine import ASSIGNMENT_KEY, EngineSettings, LongRopeEngine
from .policy import RequestTooLong

logger = logging.getLogger("longrope.app")

HEADER = "x-longrope-factor-set"
DEFAULT_SETS_DIR = Path(__file__).parent / "default_sets"

# Labels of the sets admitted while handling the current HTTP request (a mutable holder, so the value
# set by the middleware is shared with the handler however the context is copied).
_admitted: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("longrope_admitted", default=None)


class FactorSetHeaderMiddleware:
    """Pure ASGI middleware: adds the factor-set header to every response of an admitted request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: list[str] = []
        token = _admitted.set(holder)

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start" and holder:
                headers = list(message.get("headers", []))
                headers.append((HEADER.encode(), ",".join(dict.fromkeys(holder)).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            _admitted.reset(token)


def _admit_inputs(engine: LongRopeEngine, serving: Any, engine_inputs: list[Any], requested: int | None) -> Any:
    """Admit every tokenised prompt of a request; an OpenAI 400 if one does not fit."""
    admitted = []
    try:
        for ei in engine_inputs:
            if isinstance(ei, dict) and "prompt_token_ids" in ei:
                assignment = engine.admit(len(ei["prompt_token_ids"]), requested)
                ei[ASSIGNMENT_KEY] = assignment
                admitted.append(assignment)
    except (RequestTooLong, ValueError) as err:
        for assignment in admitted:  # undo the counts of the prompts admitted before the failure
            engine.in_flight[assignment.key] -= 1
            engine.served[assignment.key] -= 1
        return serving.create_error_response(str(err), err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST)
    holder = _admitted.get()
    if holder is not None:
        holder.extend(a.key for a in admitted)
    return None


def install_admission(engine: LongRopeEngine, state: Any) -> None:
    """Wrap the serving objects' render methods (vLLM 0.32 names) with admission."""
    completion = getattr(state, "openai_serving_completion", None)
    if completion is not None:
        original_completion = completion.render_completion_request

        async def render_completion_request(request: Any) -> Any:
            result = await original_completion(request)
            if isinstance(result, list):
                error = _admit_inputs(engine, completion, result, request.max_tokens)
                if error is not None:
                    return error
            return result

        completion.render_completion_request = render_completion_request

    chat = getattr(state, "openai_serving_chat", None)
    if chat is not None:
        original_chat = chat.render_chat_request

        async def render_chat_request(request: Any) -> Any:
            result = await original_chat(request)
            if isinstance(result, tuple):
                requested = request.max_completion_tokens or request.max_tokens
                error = _admit_inputs(engine, chat, result[1], requested)
                if error is not None:
                    return error
            return result

        chat.render_chat_request = render_chat_request


def _add_outer_middleware(app: Any, cls: type) -> None:
    """Add an ASGI middleware to vLLM's app. ``build_app`` already built Starlette's middleware stack
    (so ``add_middleware`` refuses); register ours and let Starlette rebuild the stack on first use."""
    from starlette.middleware import Middleware

    app.user_middleware.insert(0, Middleware(cls))
    app.middleware_stack = None


def build_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="longrope-serve",
        description=(
            "OpenAI-compatible server (vLLM 0.32) whose requests each get their own LongRoPE factor set: the "
            "smallest set whose window holds prompt + max_tokens (or + --default-reserve when max_tokens is "
            "not given). Without --model it serves the embedded SmolLM2-135M-Instruct with its short (8k) and "
            "long (32k) sets. Every vLLM engine/server option below is passed through."
        ),
    )
    group = parser.add_argument_group("longrope")
    group.add_argument(
        "--factors",
        nargs="*",
        default=_env_list("LONGROPE_FACTORS"),
        metavar="FILE_OR_DIR",
        help="factor set files (JSON, HF config) or folders of *.json loaded at start [env LONGROPE_FACTORS]",
    )
    group.add_argument(
        "--default-reserve",
        type=int,
        default=int(os.environ.get("LONGROPE_DEFAULT_RESERVE", 256)),
        help="generation budget (tokens) assumed when a request gives no max_tokens [env LONGROPE_DEFAULT_RESERVE]",
    )
    group.add_argument(
        "--rope-table-rows",
        type=int,
        default=None,
        help="rows of the shared cos/sin table (default: twice the start-up sets' windows)",
    )
    make_arg_parser(parser)
    return parser


def _env_list(name: str) -> list[str]:
    raw = os.environ.get(name, "")
    return [p for p in raw.split(os.pathsep) if p]


async def serve(args: argparse.Namespace, model_given: bool) -> None:
    from dataclasses import fields

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    factor_paths = list(args.factors or [])
    if not model_given:
        from .default_model import ensure_default_model

        args.model = str(ensure_default_model())
        args.served_model_name = args.served_model_name or ["smollm2-135m-instruct"]
        factor_paths = factor_paths or [str(DEFAULT_SETS_DIR)]
    engine_args = AsyncEngineArgs.from_cli_args(args)
    engine_kwargs = {f.name: getattr(engine_args, f.name) for f in fields(AsyncEngineArgs) if f.name != "model"}
    settings = EngineSettings(
        model=args.model,
        factor_paths=factor_paths,
        default_reserve=args.default_reserve,
        rope_table_rows=args.rope_table_rows,
        engine_kwargs=engine_kwargs,
    )
    engine = await LongRopeEngine.start(settings)
    args.max_model_len = engine.max_model_len
    try:
        listen_address, sock = setup_server(args, reuse_port=False)
        supported_tasks = await engine.get_supported_tasks()
        app = build_app(args, supported_tasks, engine.model_config)
        await init_app_state(engine, app.state, args, supported_tasks)
        install_admission(engine, app.state)
        _add_outer_middleware(app, FactorSetHeaderMiddleware)
        logger.info("longrope-serve on %s; sets: %s", listen_address, engine.table.describe())
        shutdown_task = await serve_http(
            app, sock=sock, host=args.host, port=args.port, log_level=args.uvicorn_log_level
        )
        await shutdown_task
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM's CPU backend otherwise reserves 92% of RAM for the KV cache and refuses to start when less is
    # free; 4 GiB holds 32k tokens of the default model in fp32 many times over. Only the CPU build reads it.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    model_given = any(a == "--model" or a.startswith("--model=") for a in argv) or bool(
        os.environ.get("LONGROPE_MODEL")
    )
    if os.environ.get("LONGROPE_MODEL") and not any(a.startswith("--model") for a in argv):
        args.model = os.environ["LONGROPE_MODEL"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args, model_given))
    except (FactorSetError, RequestTooLong) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
