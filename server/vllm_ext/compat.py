"""vLLM names that moved between the supported releases, resolved against the installed one.

Only what actually moved lives here; everything else is imported where it is used. Each entry lists the
places newest first, and :mod:`.internals` checks that at least one of them exists in a given vLLM (installed
or an unpacked wheel's sources), so a move in a future release is found before anything starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# vLLM 0.33 moved the OpenAI server's argument parser to vllm.entrypoints.common.cli_args.
MAKE_ARG_PARSER_MODULES = ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args")


def _module_missing(err: ModuleNotFoundError, module: str) -> bool:
    """True when ``module`` itself (or a package above it) does not exist; False when it exists but one of
    ITS imports failed, which must not be mistaken for "this release keeps the name elsewhere"."""
    return err.name is not None and (module == err.name or module.startswith(err.name + "."))


def first_found(modules: tuple[str, ...], name: str) -> Any:
    """``name`` from the first of ``modules`` that exists and defines it; ImportError naming every place."""
    for module in modules:
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if _module_missing(err, module):
                continue
            raise
        if hasattr(found, name):
            return getattr(found, name)
    raise ImportError(f"vLLM has no {name} in any of {', '.join(modules)}; server/vllm_ext/compat.py needs updating")


def make_arg_parser(parser: Any) -> Any:
    """vLLM's own ``make_arg_parser(parser)`` (every engine and OpenAI-server option), wherever the installed
    release keeps it."""
    found: Callable[[Any], Any] = first_found(MAKE_ARG_PARSER_MODULES, "make_arg_parser")
    return found(parser)
