"""Served side by side (``python -m clients.side_by_side``): what a long-context model can *use* behind
longrope-serve against stock vLLM serving the same weights.

Three servers of one model folder (its ``longrope-sets/`` hold a short set and long ones), one at a time:

- ``longrope-serve``: the folder as it is, automatic routing (policy ``reserve``: prompt and answer on one set);
- ``stock-long`` (a): stock vLLM on a copy whose ``config.json`` carries a Phi-3-style ``longrope`` block built
  from the short set and the longest set (:func:`write_stock_long_folder`). With ``max_model_len`` above the
  original window, vLLM 0.32 applies the long factors to *every* request; the block has no n̂ (positions below
  n̂ get the long factors too);
- ``stock-short`` (b): stock vLLM on the folder's own config (plain RoPE, the model's window): longer requests
  are refused (400), which counts as a wrong answer and leaves the bucket without NLL.

One workload for all three: RULER-style task prompts (``factors.evaluation.tasks``) at each bucket length
(greedy; correct when the continuation starts with the answer) and held-out text windows of the same
length, scored by prompt NLL (``prompt_logprobs``, nats per token). Per bucket: accuracy and NLL of each
server, and whether longrope-serve is at least as good as each stock configuration. HTTP only (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from factors.evaluation.corpus import text_source
from factors.evaluation.ruler import answer_budget, load_haystack
from factors.evaluation.tasks import TASKS, TaskPrompt, make_suite
from factors.formats import MODEL_SETS_DIR, hf_config_from_sets, load_set_paths, model_set_files, read_model_rope
from factors.schema import FactorSet

from .launch import free_port, launch, stop, wait_healthy
from .served_buckets import (
    NLL_TEXT_CHARS,
    SERVED_NAME,
    SERVERS,
    Bucket,
    Runner,
    format_table,
    nll_windows,
    summarise,
    tokenize,
)

# -- the stock configurations ----------------------------------------------------------------------------


def model_sets(model_dir: Path) -> list[FactorSet]:
    """The sets in a model folder's ``longrope-sets/``, smallest window first."""
    sets = load_set_paths(model_set_files(model_dir))
    if not sets:
        raise SystemExit(f"error: {model_dir}/{MODEL_SETS_DIR} holds no factor sets")
    return sorted(sets, key=lambda fs: fs.max_len)


def write_stock_long_folder(model_dir: Path, out: Path, short: FactorSet, long: FactorSet) -> dict[str, Any]:
    """A copy of the model folder (weights linked) whose config carries the Phi-3-style ``longrope`` block
    of ``short`` and ``long``, as a Phi-3 checkpoint would ship it. HF's block has no n̂: both sets are
    written with n̂ = 0, which is how stock vLLM applies them. Returns the block written."""
    out.mkdir(parents=True, exist_ok=True)
    for item in Path(model_dir).iterdir():
        if item.name in ("config.json", MODEL_SETS_DIR) or item.is_dir():
            continue
        target = out / item.name
        if not target.exists():
            target.symlink_to(item.resolve())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    key = "rope_scaling" if "rope_scaling" in config and "rope_parameters" not in config else "rope_parameters"
    fragment = hf_config_from_sets(short.model_copy(update={"n_hat": 0}), long.model_copy(update={"n_hat": 0}), key=key)
    config.update(fragment)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return fragment


# -- the servers -----------------------------------------------------------------------------------------


def server_command(who: str, args: argparse.Namespace, folder: Path, port: int, max_len: int) -> list[str]:
    common = ["--served-model-name", SERVED_NAME, "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs)]
    common += ["--host", "127.0.0.1", "--port", str(port), *(["--enforce-eager"] if args.enforce_eager else [])]
    if who == "longrope-serve":
        exe = str(Path(sys.executable).parent / "longrope-serve")
        return [exe, "--model", str(folder), "--registry", str(args.work / "registry"), *common]
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--max-model-len",
        str(max_len),
        *common,
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clients.side_by_side",
        description=__doc__.split("\n\n")[0] + "\n\nexample:\n  python -m clients.side_by_side --model "
        "factors/data/tiny-retrieval-extended/model --lengths 224,2048,16000 --json out/side-by-side.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="model folder with its longrope-sets/")
    p.add_argument(
        "--lengths",
        required=True,
        help="bucket lengths (prompt tokens), comma-separated; a bucket is"
        " in the window when the length plus the answer fits the model's own window",
    )
    p.add_argument("--tasks", default="niah_single,niah_multikey", help="task prompts of each bucket")
    p.add_argument("--depths", type=int, default=11, help="needle depths spread over [0, 1]")
    p.add_argument("--samples", type=int, default=2, help="prompts per task and depth in each bucket")
    p.add_argument(
        "--long-samples", type=int, help="prompts per task and depth in buckets above --cheap-until (default --samples)"
    )
    p.add_argument("--cheap-until", type=int, default=4096, help="see --long-samples")
    p.add_argument("--nll-windows", type=int, default=4, help="held-out text windows per bucket (at least)")
    p.add_argument(
        "--nll-tokens",
        type=int,
        default=65536,
        help="at least this many NLL tokens per bucket: more windows where they are short (a bucket's NLL is"
        " then as precise as another's)",
    )
    p.add_argument("--haystack", default="licenses:heldout+copyright:heldout", help="text the needles hide in")
    p.add_argument("--nll-text", default="licenses:heldout+copyright:heldout", help="text of the NLL windows")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and windows")
    p.add_argument("--servers", default=",".join(SERVERS), help="which of " + ", ".join(SERVERS))
    p.add_argument("--dtype", default="float32", help="dtype of all three servers (fp32: NLLs comparable to 1e-4)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="vLLM --max-num-seqs of all three servers")
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="vLLM --enforce-eager on all three servers (no compile: quicker starts)",
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    p.add_argument("--work", type=Path, help="folder for logs and the stock config copy (default: a temp dir)")
    p.add_argument("--json", type=Path, help="write the whole report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_work = args.work is not None
    args.work = args.work or Path(tempfile.mkdtemp(prefix="side-by-side-"))
    args.work.mkdir(parents=True, exist_ok=True)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(servers) - set(SERVERS))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if unknown or "longrope-serve" not in servers or set(tasks) - set(TASKS):
        raise SystemExit(
            f"error: servers are {', '.join(SERVERS)} (longrope-serve among them); tasks {', '.join(TASKS)}"
        )
    window = read_model_rope(args.model).geometry.original_max_len
    sets = model_sets(args.model)
    short, long = sets[0], sets[-1]
    lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    if lengths[-1] + 32 > long.max_len:
        raise SystemExit(
            f"error: the longest bucket {lengths[-1]} (+ answer) exceeds the longest set's window {long.max_len}"
        )
    haystack = load_haystack(args.haystack)
    prompts: list[TaskPrompt] = []
    for n in lengths:
        k = args.samples if n <= args.cheap_until else (args.long_samples or args.samples)
        prompts += make_suite(tasks, [n], args.depths, k, haystack, args.seed)
    longest_answer = max(answer_budget(p.answer) for p in prompts)
    buckets = [Bucket(n, n + longest_answer <= window) for n in lengths]
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    stock_long = args.work / "stock-long-model"
    block = write_stock_long_folder(args.model, stock_long, short, long)
    folders = {"longrope-serve": args.model, "stock-long": stock_long, "stock-short": args.model}
    max_lens = {"longrope-serve": long.max_len, "stock-long": long.max_len, "stock-short": window}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    windows: dict[int, list[list[int]]] = {}
    timings: dict[str, float] = {}
    for who in servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        logfile = args.work / f"{who}.log"
        proc = launch(server_command(who, args, folders[who], port, max_lens[who]), logfile, env)
        try:
            wait_healthy(url, proc, logfile)
            log(f"{who} up ({logfile})")
            if not windows:
                ids = tokenize(url, text_source(args.nll_text, max_chars=NLL_TEXT_CHARS))
                count = {n: max(args.nll_windows, -(-args.nll_tokens // n)) for n in lengths}
                windows = {n: nll_windows(ids, n, count[n], args.seed) for n in lengths}
            t0 = time.monotonic()
            Runner(url, who == "longrope-serve", args.concurrency, args.timeout).run(
                prompts, windows, buckets, who, log
            )
            timings[who] = round(time.monotonic() - t0, 1)
        finally:
            stop(proc)
    verdict = summarise(buckets)
    print(format_table(buckets))
    print(f"\nlongrope-serve ≥ every stock configuration in every bucket: {verdict['ok']}")
    report = {
        "model": str(args.model),
        "window": window,
        "sets": [fs.name for fs in sets],
        "stock_long_config": block,
        "workload": {
            "tasks": tasks,
            "depths": args.depths,
            "samples": args.samples,
            "long_samples": args.long_samples,
            "cheap_until": args.cheap_until,
            "nll_windows": args.nll_windows,
            "nll_tokens": args.nll_tokens,
            "haystack": args.haystack,
            "nll_text": args.nll_text,
            "seed": args.seed,
        },
        "seconds": timings,
        "buckets": [
            {"length": b.length, "in_window": b.in_window, **{s: c.to_json() for s, c in b.cells.items()}}
            for b in buckets
        ],
        "verdict": verdict,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if keep_work:
        print(f"logs and the stock config copy: {args.work}", file=sys.stderr)
    else:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
