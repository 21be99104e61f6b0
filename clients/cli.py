"""``longrope-client``: talk to a running longrope-serve — chat, complete, manage factor sets, stats, bench."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from server.protocol import ROUTINGS

from .client import (
    DEFAULT_URL,
    AdminClient,
    LongRopeError,
    ServerUnavailable,
    dumps,
    factor_set_of,
    named_set,
    openai_client,
    stats,
)
from .ruler import add_ruler_command

EPILOG = """\
environment: LONGROPE_URL (default http://127.0.0.1:8000), LONGROPE_ADMIN_TOKEN (admin commands)

examples:
  longrope-client chat "Summarise LongRoPE in one line" --max-tokens 64
  longrope-client complete "Once upon a time" --max-tokens 32
  longrope-client complete "Once upon a time" --max-tokens 32 --factor-set long-64k-b
  longrope-client factors list
  longrope-client factors load long-64k.json
  longrope-client factors load long-64k-b.json --routing explicit   # only requests naming it get it
  longrope-client factors routing long-64k-b auto                   # promote it (explicit: demote)
  longrope-client factors load 8k.csv --name long-64k --max-len 65536
  longrope-client factors rollback long-64k
  longrope-client factors retire long-64k
  longrope-client stats
  longrope-client bench --json out/bench.json"""


def _model(args: argparse.Namespace, client: Any) -> str:
    if args.model:
        return args.model
    return client.models.list().data[0].id


def _stream(args: argparse.Namespace, chat: bool) -> int:
    import openai

    client = openai_client(args.url, max_retries=0)
    try:
        model = _model(args, client)
        kwargs: dict[str, Any] = {
            "model": model,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "stream": True,
        }
        if args.factor_set:
            kwargs["extra_body"] = named_set(args.factor_set)
        if chat:
            api = client.chat.completions.with_streaming_response.create
            kwargs["messages"] = [{"role": "user", "content": args.prompt}]
        else:
            api = client.completions.with_streaming_response.create
            kwargs["prompt"] = args.prompt
        with api(**kwargs) as response:
            label = factor_set_of(response)
            for chunk in response.parse():
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                text = (choice.delta.content if chat else choice.text) or ""
                sys.stdout.write(text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        print(f"[factor set: {label}]", file=sys.stderr)
        return 0
    except openai.APIConnectionError as err:
        raise ServerUnavailable(args.url, err) from None
    except openai.APIStatusError as err:
        try:
            message = err.response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = err.response.text[:500]
        raise LongRopeError(err.status_code, message) from None


def cmd_chat(args: argparse.Namespace) -> int:
    return _stream(args, chat=True)


def cmd_complete(args: argparse.Namespace) -> int:
    return _stream(args, chat=False)


def cmd_factors(args: argparse.Namespace) -> int:
    with AdminClient(args.url, args.token) as admin:
        if args.action == "list":
            sets = admin.list()
            if args.json:
                print(dumps(sets))
                return 0
            print(
                f"{'set':<24} {'window':>9} {'routing':>8} {'n̂':>4} {'mscale':>8} {'λ min…max':>16} {'served':>7}"
                f" {'in flight':>9}  provenance"
            )
            for s in sets:
                lam = f"{s.factors.min:.3g}…{s.factors.max:.3g}"
                print(
                    f"{s.label:<24} {s.max_len:>9} {s.routing:>8} {s.n_hat:>4} {s.mscale:>8.4f} {lam:>16}"
                    f" {s.requests_served:>7} {s.in_flight:>9}  {s.provenance.get('method')}"
                )
            return 0
        if args.action == "load":
            if args.file.lower().endswith(".csv"):
                if args.name is None or args.max_len is None:
                    raise LongRopeError(2, "loading a CSV needs --name and --max-len (the CSV holds only λ_i)")
                loaded = [admin.load_csv(args.file, args.name, args.max_len, args.n_hat, args.mscale, args.routing)]
            else:
                loaded = admin.load(args.file, monotone=args.monotone, routing=args.routing)
            for s in loaded:
                print(f"loaded {s.label} (window {s.max_len}), routing {s.routing}")
            return 0
        if args.action == "routing":
            s = admin.set_routing(args.name, args.routing)
            print(f"{s.label} routing {s.routing}")
            return 0
        if args.action == "rollback":
            s = admin.rollback(args.name)
            print(f"{args.name} is back on {s.label}")
            return 0
        print(f"retired {admin.retire(args.name)}")
        return 0


def _quantiles(m: dict[str, Any]) -> str:
    return "/".join("-" if m.get(p) is None else f"{m[p]:.0f}" for p in ("p50", "p90", "p99"))


def cmd_stats(args: argparse.Namespace) -> int:
    data = stats(args.url)
    if args.json:
        print(dumps(data))
        return 0
    if not data:
        print("no per-set traffic recorded yet")
        return 0
    print(f"{'set':<24} {'finished':>8} {'aborted':>7} {'error':>5}   prompt p50/p90/p99        context p50/p90/p99")
    for key, entry in sorted(data.items()):
        req = entry["requests"]
        prompt, context = _quantiles(entry["prompt_tokens"]), _quantiles(entry["context_tokens"])
        counts = f"{req.get('finished', 0):>8} {req.get('aborted', 0):>7} {req.get('error', 0):>5}"
        print(f"{key:<24} {counts}   {prompt:<24} {context}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longrope-client",
        description="Client of a running longrope-serve.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=os.environ.get("LONGROPE_URL", DEFAULT_URL), help="server base URL [LONGROPE_URL]")
    p.add_argument(
        "--token", default=os.environ.get("LONGROPE_ADMIN_TOKEN"), help="admin bearer token [LONGROPE_ADMIN_TOKEN]"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, func, helptext in (
        ("chat", cmd_chat, "one chat turn, streamed"),
        ("complete", cmd_complete, "a text completion, streamed"),
    ):
        c = sub.add_parser(
            name, help=helptext, description=f"{helptext}; prints the factor set that served it on stderr."
        )
        c.add_argument("prompt")
        c.add_argument("--model", help="model name (default: the server's first)")
        c.add_argument("--max-tokens", type=int, default=128)
        c.add_argument("--temperature", type=float, default=0.0)
        c.add_argument(
            "--factor-set",
            metavar="NAME",
            help="run on this live set, pinned (an explicit set too); default: automatic",
        )
        c.set_defaults(func=func)
    f = sub.add_parser("factors", help="list | load | routing | rollback | retire factor sets (admin API)")
    fsub = f.add_subparsers(dest="action", required=True, metavar="ACTION")
    lst = fsub.add_parser("list", help="live sets with version, window, n̂, mscale, λ range, traffic")
    lst.add_argument("--json", action="store_true")
    load = fsub.add_parser("load", help="load a factor-set JSON, an HF config.json, or a LongRoPE CSV")
    load.add_argument("file")
    load.add_argument("--name", help="set name (CSV only)")
    load.add_argument("--max-len", type=int, help="window in tokens (CSV only)")
    load.add_argument("--n-hat", type=int, default=0, help="n̂ (CSV only)")
    load.add_argument("--mscale", type=float, help="mscale (CSV only; default LongRoPE's formula)")
    load.add_argument("--monotone", choices=["warn", "reject", "ignore"], default="warn", help="non-monotone λ policy")
    load.add_argument(
        "--routing",
        choices=ROUTINGS,
        help="explicit: only requests naming the set get it (A/B it before it takes traffic); default: auto for a"
        " new name, an existing name keeps its routing",
    )
    rt = fsub.add_parser("routing", help="promote a set to automatic routing (auto) or demote it (explicit)")
    rt.add_argument("name")
    rt.add_argument("routing", choices=ROUTINGS)
    for action, helptext in (("rollback", "make the previous version live again"), ("retire", "stop serving a set")):
        a = fsub.add_parser(action, help=helptext)
        a.add_argument("name")
    f.set_defaults(func=cmd_factors)
    s = sub.add_parser("stats", help="per-set request counts and context-length percentiles from /metrics")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)
    b = sub.add_parser("bench", help="benchmark against stock vLLM (see: longrope-client bench --help)", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    b.set_defaults(func=cmd_bench)
    add_ruler_command(sub)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "bench":
        args.rest = unknown + args.rest
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except ServerUnavailable as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 3
    except LongRopeError as err:
        print(f"error: {err.message}" + (f" (HTTP {err.status})" if err.status >= 100 else ""), file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
