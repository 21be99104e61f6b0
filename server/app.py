"""``longrope-serve``: vLLM's OpenAI-compatible server around the per-request LongRoPE engine.

vLLM's own app is reused as it is (``build_app`` + ``init_app_state``: chat templates, streaming,
logprobs, usage, ``/v1/models``, ``/health``, ``/metrics``); two things are added:

- admission (:mod:`server.admission`, hooked by :func:`server.vllm_ext.frontend.install_admission`): once a
  prompt is tokenised, the request is admitted to a factor set (and refused with an OpenAI-shaped 400 when
  no window holds it) before any response header is sent;
- an ASGI middleware (:mod:`server.middleware`) adds ``x-longrope-factor-set: NAME@VERSION`` to the
  response, streamed or not.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from factors.schema import FactorSetError

from .admin import install_admin
from .engine import EngineSettings, LongRopeEngine
from .middleware import FactorSetHeaderMiddleware
from .policy import POLICIES, RequestTooLong
from .settings import ServerSettings
from .startup import UnsupportedOption
from .vllm_ext import UnsupportedVllmVersion, check_vllm_version
from .vllm_ext.frontend import (
    add_outer_middleware,
    add_vllm_args,
    build_openai_app,
    engine_kwargs_from_args,
    install_admission,
    new_parser,
    serve_openai_app,
)

logger = logging.getLogger("longrope.app")

DEFAULT_SETS_DIR = Path(__file__).parent / "default_sets"


def build_parser(settings: ServerSettings) -> argparse.ArgumentParser:
    parser = new_parser(
        prog="longrope-serve",
        description=(
            "OpenAI-compatible server (vLLM 0.32) whose requests each get their own LongRoPE factor set, never "
            "mixed in one request's KV cache. By default (--policy upgrade) a request starts on the smallest set "
            "whose window holds its prompt and, when generation outgrows that window, moves to the next larger "
            "set by recomputing its cache there. Without --model it serves the embedded SmolLM2-135M-Instruct with its short (8k) and "
            "long (32k) sets. Every longrope option can also be set by environment (LONGROPE_<OPTION>); every "
            "vLLM engine/server option below is passed through."
        ),
    )
    group = parser.add_argument_group("longrope")
    group.add_argument(
        "--factors",
        nargs="*",
        default=settings.factors,
        metavar="FILE_OR_DIR",
        help="factor set files (JSON, HF config) or folders of *.json loaded at start [LONGROPE_FACTORS, JSON list]",
    )
    group.add_argument(
        "--registry",
        default=settings.registry,
        metavar="DIR",
        help="folder where loaded sets persist and are restored at start [LONGROPE_REGISTRY]",
    )
    group.add_argument(
        "--registry-watch",
        type=float,
        default=settings.registry_watch,
        metavar="SECONDS",
        help=(
            "with --registry: check the registry every SECONDS for sets loaded, rolled back or retired through "
            "another replica sharing it, and serve them too (0 turns it off) [LONGROPE_REGISTRY_WATCH]"
        ),
    )
    group.add_argument(
        "--default-reserve",
        type=int,
        default=settings.default_reserve,
        help="generation budget (tokens) assumed when a request gives no max_tokens [LONGROPE_DEFAULT_RESERVE]",
    )
    group.add_argument(
        "--policy",
        choices=POLICIES,
        default=settings.policy,
        help=(
            "upgrade: start on the smallest window holding the prompt, move up (recomputing the cache) when "
            "generation outgrows it; reserve: start on the smallest window holding prompt + max_tokens (or "
            "+ --default-reserve), stop at it; pin: start like upgrade, never move, stop at the window. "
            'Per request: vllm_xargs {"longrope_policy": ...} [LONGROPE_POLICY]'
        ),
    )
    group.add_argument(
        "--admin-token-file",
        type=Path,
        default=settings.admin_token_file,
        help="file with the admin API's bearer token; or set LONGROPE_ADMIN_TOKEN; without either the admin API is off",
    )
    group.add_argument(
        "--admin-port",
        type=int,
        default=settings.admin_port,
        help="serve the admin API only on this port (not on the OpenAI API port) [LONGROPE_ADMIN_PORT]",
    )
    group.add_argument(
        "--admin-host",
        default=settings.admin_host,
        help="interface for --admin-port (default 127.0.0.1: local only) [LONGROPE_ADMIN_HOST]",
    )
    add_vllm_args(parser)
    return parser


async def serve_admin_port(engine: LongRopeEngine, token: str, host: str, port: int, log_level: str) -> None:
    """The admin API on its own port (e.g. bound to an internal interface only)."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI(title="longrope-serve admin", docs_url=None, redoc_url=None)
    install_admin(app, engine, token)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off"))
    logger.info("admin API on http://%s:%d/admin (not on the OpenAI API port)", host, port)
    await server.serve()


async def serve(args: argparse.Namespace, model_given: bool, admin_token: str | None) -> None:
    factor_paths = list(args.factors or [])
    if not model_given:
        from .default_model import ensure_default_model

        args.model = str(ensure_default_model())
        args.served_model_name = args.served_model_name or ["smollm2-135m-instruct"]
        factor_paths = factor_paths or [str(DEFAULT_SETS_DIR)]
    engine_kwargs = engine_kwargs_from_args(args)
    settings = EngineSettings(
        model=args.model,
        factor_paths=factor_paths,
        default_reserve=args.default_reserve,
        policy=args.policy,
        registry_dir=args.registry,
        engine_kwargs=engine_kwargs,
    )
    engine = await LongRopeEngine.start(settings)
    args.max_model_len = engine.max_model_len
    background: list[asyncio.Task] = []
    try:
        app, sock, listen_address = await build_openai_app(engine, args)
        install_admission(app.state, engine.admission.admit_prompts)
        if admin_token is None:
            logger.warning("admin API is off (no LONGROPE_ADMIN_TOKEN / --admin-token-file)")
            install_admin(app, engine, None)
        elif args.admin_port:
            moved = (
                f"the admin API is not on this port: it is served on {args.admin_host}:{args.admin_port} (--admin-port)"
            )
            install_admin(app, engine, None, moved)  # the main port answers 404 for /admin
            background.append(
                asyncio.create_task(
                    serve_admin_port(engine, admin_token, args.admin_host, args.admin_port, args.uvicorn_log_level)
                )
            )
        else:
            install_admin(app, engine, admin_token)
        if args.registry and args.registry_watch > 0:
            background.append(asyncio.create_task(engine.watch_registry(args.registry_watch)))
        add_outer_middleware(app, FactorSetHeaderMiddleware, engine=engine)
        logger.info("longrope-serve on %s; sets: %s; policy %s", listen_address, engine.table.describe(), args.policy)
        await serve_openai_app(app, sock, args)
    finally:
        for task in background:
            task.cancel()
        engine.shutdown()


def _configure_logging() -> None:
    """Give longrope-serve's loggers (``longrope.*``) their own handler, as vLLM does for ``vllm.*``: the
    root logger's setup does not survive vLLM's app start-up (our log lines after it were lost)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("longrope")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.INFO)
    ours.propagate = False


def _given(argv: list[str], option: str) -> bool:
    """The command line sets ``option`` (``--opt value`` or ``--opt=value``): it wins over LONGROPE_*."""
    return any(a == option or a.startswith(option + "=") for a in argv)


def refused_server_options(args: argparse.Namespace) -> str | None:
    """vLLM server options longrope-serve refuses (the engine's are checked by
    :func:`server.startup.check_engine_options`): the message, or None."""
    count = getattr(args, "api_server_count", None)
    if count is not None and count > 1:
        return (
            f"--api-server-count {count}: longrope-serve runs one API process (admissions and set counts live in"
            " it); run several longrope-serve replicas sharing one --registry behind a load balancer (docs/deploy.md)"
        )
    if getattr(args, "headless", False):
        return "--headless: longrope-serve's API process is where requests get their sets; drop the option"
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM's CPU backend otherwise reserves 92% of RAM for the KV cache and refuses to start when less is
    # free; 4 GiB holds 32k tokens of the default model in fp32 many times over. Only the CPU build reads it.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    argv = sys.argv[1:] if argv is None else argv
    _configure_logging()
    try:
        check_vllm_version()
    except UnsupportedVllmVersion as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        settings = ServerSettings()
    except ValueError as err:
        print(f"error: bad LONGROPE_* environment: {err}", file=sys.stderr)
        return 2
    args = build_parser(settings).parse_args(argv)
    model_given = _given(argv, "--model")
    if not model_given and settings.model:
        args.model, model_given = settings.model, True
    if settings.served_model_name and not args.served_model_name:
        args.served_model_name = [settings.served_model_name]
    if settings.host and not _given(argv, "--host"):
        args.host = settings.host
    if settings.port and not _given(argv, "--port"):
        args.port = settings.port
    refused = refused_server_options(args)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    try:
        admin_token = settings.model_copy(update={"admin_token_file": args.admin_token_file}).resolved_admin_token()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args, model_given, admin_token))
    except (FactorSetError, RequestTooLong, UnsupportedOption) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
