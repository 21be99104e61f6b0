"""``longrope-client ruler`` / ``python -m clients.ruler``: the RULER-style suite against a running server.

The same prompts, answer budget and records as ``longrope-factors ruler`` (offline), sent as OpenAI
completions (temperature 0, ``max_tokens`` = the answer's bytes, no echo), so offline and served accuracy
can be compared prompt by prompt. Each request may name its factor set (``vllm_xargs``
``longrope_factor_set``); without ``--set`` the server routes it (policy ``reserve``: the prompt and the
whole answer on one set) and the record names the set the response header reports. HTTP only: no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import httpx

from factors.cli.ruler import RulerHelpFormatter, add_suite_options, check_outputs, suite_from_args, write_outputs
from factors.evaluation.ruler import Prediction, answer_budget, predicted, sample_indices
from factors.evaluation.tasks import TaskPrompt
from factors.schema import FactorSetError
from server.protocol import FACTOR_SET_HEADER, FACTOR_SET_XARG, POLICY_XARG

from .client import DEFAULT_URL, LongRopeError, ServerUnavailable

ROUTED = None  # a --set left out: the server picks the set
EXAMPLES = """\
examples:
  longrope-client ruler --lengths 128,256,512 --depths 11 --samples 4 --plot heatmap.png
  longrope-client ruler --set longrope-short --set longrope-1024 --lengths 1024 --json > served.jsonl
  python -m clients.ruler --url http://127.0.0.1:8000 --model tiny --lengths 256 --concurrency 8"""


def _error(err: Exception, url: str) -> LongRopeError:
    """An OpenAI SDK error as the client's own (exit 2 for a refusal, 3 for no server)."""
    import openai

    if isinstance(err, openai.APIConnectionError):
        return ServerUnavailable(url, err)
    if isinstance(err, openai.APIStatusError):
        try:
            message = err.response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = err.response.text[:500]
        return LongRopeError(err.status_code, message)
    return LongRopeError(0, f"{type(err).__name__}: {err}")


def token_counter(url: str, model: str, timeout: float = 60.0) -> Callable[[str], int]:
    """Prompt tokens as the server counts them (vLLM's ``/tokenize``), for the english template's lengths."""
    http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    @lru_cache(maxsize=4096)
    def count(text: str) -> int:
        try:
            resp = http.post("/tokenize", json={"model": model, "prompt": text})
        except httpx.HTTPError as err:
            raise ServerUnavailable(url, err) from None
        if resp.status_code != 200:
            raise LongRopeError(resp.status_code, f"/tokenize answered {resp.text[:300]}")
        return int(resp.json()["count"])

    return count


def served_predictions(
    url: str,
    model: str,
    prompts: Sequence[TaskPrompt],
    sets: Sequence[str | None] = (ROUTED,),
    *,
    concurrency: int = 4,
    timeout: float = 600.0,
    progress: bool = True,
) -> list[Prediction]:
    """Every prompt's greedy continuation from the server, once per set name (``None``: the server routes),
    set after set, in suite order. Raises LongRopeError / ServerUnavailable on the first failed request."""
    import openai
    from tqdm import tqdm

    client = openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="unused", max_retries=0, timeout=timeout)
    samples = sample_indices(prompts)

    def one(name: str | None, i: int) -> Prediction:
        p = prompts[i]
        xargs = {FACTOR_SET_XARG: name} if name else {POLICY_XARG: "reserve"}
        try:
            raw = client.completions.with_raw_response.create(
                model=model,
                prompt=p.prompt,
                max_tokens=answer_budget(p.answer),
                temperature=0.0,
                echo=False,
                extra_body={"vllm_xargs": xargs},
            )
        except openai.OpenAIError as err:
            raise _error(err, url) from None
        label = raw.headers.get(FACTOR_SET_HEADER)  # NAME@VERSION (absent from a stock vLLM server)
        served = label.rsplit("@", 1)[0] if label else (name or "served")
        if name and served != name:
            raise LongRopeError(0, f"asked for set {name!r}, the server answered on {label!r}")
        completion = raw.parse()
        return predicted(served, p, samples[i], completion.choices[0].text, completion.usage.prompt_tokens)

    out: list[Prediction] = []
    bar = tqdm(total=len(sets) * len(prompts), unit="prompt", disable=not progress, desc="ruler")
    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            for name in sets:
                bar.set_postfix_str(name or "routed")
                futures = [pool.submit(one, name, i) for i in range(len(prompts))]
                try:
                    for f in futures:
                        out.append(f.result())
                        bar.update()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    return out


def first_model(url: str) -> str:
    """The server's first served model name (``/v1/models``)."""
    try:
        data = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=30).json()["data"]
    except httpx.HTTPError as err:
        raise ServerUnavailable(url, err) from None
    except (ValueError, KeyError) as err:
        raise LongRopeError(0, f"{url}/v1/models did not list models ({err})") from None
    if not data:
        raise LongRopeError(0, f"{url} serves no model")
    return data[0]["id"]


def cmd_ruler(args: argparse.Namespace) -> int:
    model = args.model or first_model(args.url)
    measure = token_counter(args.url, model) if args.template != "compact" else None
    try:
        check_outputs(args)
        prompts = suite_from_args(args, measure)
    except FactorSetError as err:
        raise LongRopeError(2, str(err)) from None
    t0 = time.monotonic()
    predictions = served_predictions(
        args.url,
        model,
        prompts,
        args.set or [ROUTED],
        concurrency=args.concurrency,
        timeout=args.timeout,
        progress=not args.no_progress,
    )
    print(f"ruler: {len(predictions)} predictions in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    try:
        return write_outputs(args, predictions)
    except FactorSetError as err:
        raise LongRopeError(2, str(err)) from None


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME", help="served model name (default: the server's first)")
    p.add_argument(
        "--set",
        action="append",
        metavar="NAME",
        help="a live factor set to run every prompt on (vllm_xargs longrope_factor_set); repeatable;"
        " default: the server routes each prompt (policy reserve) and records name the set it used",
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    add_suite_options(p)


DESCRIPTION = (
    "Run the RULER-style suite (docs/ruler.md) against a running server over OpenAI completions; the same\n"
    "prompts and records as `longrope-factors ruler` offline.\n\n" + EXAMPLES
)


def add_ruler_command(sub: Any) -> None:
    """Register ``ruler`` on longrope-client's subparsers (which give --url)."""
    p = sub.add_parser(
        "ruler", help="RULER-style retrieval accuracy against the server", formatter_class=RulerHelpFormatter
    )
    p.description = DESCRIPTION
    _add_options(p)
    p.set_defaults(func=cmd_ruler)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clients.ruler", description=DESCRIPTION, formatter_class=RulerHelpFormatter
    )
    p.add_argument("--url", default=os.environ.get("LONGROPE_URL", DEFAULT_URL), help="server base URL [LONGROPE_URL]")
    _add_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_ruler(args)
    except ServerUnavailable as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 3
    except LongRopeError as err:
        print(f"error: {err.message}" + (f" (HTTP {err.status})" if err.status >= 100 else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
