"""Speculative decoding benchmark: longrope-serve with ngram prompt lookup against the same server without it.

Two workloads, greedy, one request at a time by default (where drafting pays most):

- ``copy``: long documents whose continuation repeats spans of the prompt (what prompt lookup is for:
  questions over a document, code edits, extraction). Chat models are asked to reproduce a passage; a plain
  language model gets a passage whose tail restarts it.
- ``novel``: short prompts whose output the prompt does not contain: the cost of drafting that finds
  little.

Both servers run the same model, sets and engine options; every output must be identical token for token
(speculation verifies every draft with the target model, so it may change speed, never text). Run in
float32 (``--server-arg=--dtype=float32``): in bf16 a step that verifies several tokens rounds differently
from one that decodes one, so greedy text may part at a near-tie, with or without per-request sets. Reports
generated tokens per second of each, the speed-up, and drafted / accepted tokens per factor set from
``/metrics`` (``longrope_spec_decode_*_tokens_total``).

    python -m clients.spec_bench --server-arg=--dtype=float32 --json out/bench/spec.json   # embedded SmolLM2
    python -m clients.spec_bench --model factors/data/tiny-finetuned/model --completion \
        --spec '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 3, "prompt_lookup_max": 5}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from factors.evaluation.corpus import pydoc_text, stdlib_text

from .launch import default_model_path, free_port, launch, stop, wait_healthy

DEFAULT_SETS = Path(__file__).resolve().parents[1] / "server" / "default_sets"
SPEC = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
SERVED = "spec-bench"


@dataclass
class Job:
    workload: str
    prompt: str


@dataclass
class Output:
    text: str
    token_ids: list[int] | None
    completion_tokens: int
    seconds: float


@dataclass
class Run:
    server: str  # "ngram" or "plain"
    workload: str
    tokens: int
    seconds: float
    outputs: list[Output] = field(default_factory=list)
    spec_by_set: dict[str, dict[str, float]] = field(default_factory=dict)  # drafted/accepted during this run

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def make_jobs(n: int, doc_chars: int, chat: bool) -> list[Job]:
    """``n`` copy jobs (held-out stdlib source: documents the models never trained on) and ``n`` novel ones."""
    code = stdlib_text("heldout", (n + 1) * doc_chars * 3)
    prose = pydoc_text("heldout", 50_000)
    jobs = []
    for i in range(n):
        doc = code[i * doc_chars * 2 :][:doc_chars]
        if chat:
            prompt = f"Here is a piece of code:\n\n{doc}\n\nRepeat the code above exactly, from its first line."
        else:
            prompt = doc + "\n" + doc[:80]
        jobs.append(Job("copy", prompt))
    for i in range(n):
        start = prose[i * 997 :][:200]
        prompt = f"Write a short story about {start.split()[0].lower()} and a lighthouse." if chat else start
        jobs.append(Job("novel", prompt))
    return jobs


async def one(client: httpx.AsyncClient, url: str, job: Job, max_tokens: int, chat: bool, timeout: float) -> Output:
    body: dict[str, Any] = {"model": SERVED, "max_tokens": max_tokens, "temperature": 0.0, "return_token_ids": True}
    t0 = time.monotonic()
    if chat:
        body["messages"] = [{"role": "user", "content": job.prompt}]
        r = await client.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
    else:
        body["prompt"] = job.prompt
        r = await client.post(f"{url}/v1/completions", json=body, timeout=timeout)
    seconds = time.monotonic() - t0
    r.raise_for_status()
    data = r.json()
    choice = data["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    return Output(text, choice.get("token_ids"), data["usage"]["completion_tokens"], seconds)


async def run_workload(url: str, jobs: list[Job], max_tokens: int, chat: bool, concurrency: int, timeout: float):
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient() as client:

        async def guarded(job: Job) -> Output:
            async with gate:
                return await one(client, url, job, max_tokens, chat, timeout)

        t0 = time.monotonic()
        outputs = await asyncio.gather(*(guarded(j) for j in jobs))
        return outputs, time.monotonic() - t0


def spec_counters(url: str) -> dict[str, dict[str, float]]:
    """longrope_spec_decode_{drafted,accepted}_tokens_total by factor set, from /metrics."""
    counts: dict[str, dict[str, float]] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for kind in ("drafted", "accepted"):
            prefix = f"longrope_spec_decode_{kind}_tokens_total{{"
            if line.startswith(prefix):
                labels, value = line[len(prefix) :].rsplit("} ", 1)
                name = labels.split('factor_set="', 1)[1].split('"', 1)[0]
                counts.setdefault(name, {"drafted": 0.0, "accepted": 0.0})[kind] += float(value)
    return counts


def counter_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]):
    zero = {"drafted": 0.0, "accepted": 0.0}
    return {k: {m: v[m] - before.get(k, zero)[m] for m in v} for k, v in after.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.spec_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the embedded SmolLM2 default model, with its sets)")
    p.add_argument("--factors", nargs="*", help="factor files/folders (default: the model folder's own sets)")
    p.add_argument("--completion", action="store_true", help="plain completions (models without a chat template)")
    p.add_argument("--requests", type=int, default=3, help="requests per workload")
    p.add_argument("--doc-chars", type=int, default=2400, help="characters of each copy document")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument(
        "--rounds", type=int, default=2, help="rounds per server and workload, in ABBA order (the load drifts)"
    )
    p.add_argument("--spec", default=json.dumps(SPEC), help="--speculative-config of the ngram server (JSON)")
    p.add_argument("--server-arg", action="append", default=[], help="extra option for both servers (repeatable)")
    p.add_argument("--log-dir", type=Path, default=Path("out/bench"))
    p.add_argument("--json", type=Path, help="write the report as JSON")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args(argv)

    chat = not args.completion
    model = args.model or default_model_path()
    factors = args.factors if args.factors is not None else ([] if args.model else [str(DEFAULT_SETS)])
    args.log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    serve = str(Path(sys.executable).parent / "longrope-serve")
    servers: dict[str, tuple[Any, str]] = {}
    try:
        for name, extra in (("plain", []), ("ngram", ["--speculative-config", args.spec])):
            port = free_port()
            cmd = [serve, "--model", model, "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port)]
            cmd += (["--factors", *factors] if factors else []) + args.server_arg + extra
            log = args.log_dir / f"spec-bench-{name}.log"
            servers[name] = (launch(cmd, log, env), f"http://127.0.0.1:{port}")
            wait_healthy(servers[name][1], servers[name][0], log)
        jobs = make_jobs(args.requests, args.doc_chars, chat)
        warm = [Job("warm-up", jobs[-1].prompt[:60])]
        for _, url in servers.values():
            asyncio.run(run_workload(url, warm, 8, chat, 1, args.timeout))
        runs: list[Run] = []
        for workload in ("copy", "novel"):
            batch = [j for j in jobs if j.workload == workload]
            order = [("plain", "ngram"), ("ngram", "plain")]
            for name in (name for r in range(args.rounds) for name in order[r % 2]):
                url = servers[name][1]
                before = spec_counters(url)
                outputs, seconds = asyncio.run(
                    run_workload(url, batch, args.max_tokens, chat, args.concurrency, args.timeout)
                )
                tokens = sum(o.completion_tokens for o in outputs)
                runs.append(Run(name, workload, tokens, seconds, outputs, counter_delta(before, spec_counters(url))))
        report = build_report(runs, args, model)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["identical_outputs"] else 1


def merge(runs: list[Run]) -> Run:
    """The rounds of one server on one workload as one run (tokens and seconds summed, first round's outputs)."""
    spec: dict[str, dict[str, float]] = {}
    for r in runs:
        for k, v in r.spec_by_set.items():
            total = spec.setdefault(k, {"drafted": 0.0, "accepted": 0.0})
            for m in total:
                total[m] += v[m]
    return Run(
        runs[0].server,
        runs[0].workload,
        sum(r.tokens for r in runs),
        sum(r.seconds for r in runs),
        runs[0].outputs,
        spec,
    )


def build_report(runs: list[Run], args: argparse.Namespace, model: str) -> dict[str, Any]:
    workloads = {}
    identical = True
    for workload in ("copy", "novel"):
        mine = [r for r in runs if r.workload == workload]
        differ = [  # every round of either server against the plain server's first round
            (i, r)
            for r in mine
            for i, (a, b) in enumerate(zip(mine[0].outputs, r.outputs, strict=True))
            if a.text != b.text or a.token_ids != b.token_ids
        ]
        plain = merge([r for r in mine if r.server == "plain"])
        ngram = merge([r for r in mine if r.server == "ngram"])
        identical &= not differ
        workloads[workload] = {
            "plain_tokens_per_s": round(plain.tokens_per_s, 2),
            "ngram_tokens_per_s": round(ngram.tokens_per_s, 2),
            "speedup": round(ngram.tokens_per_s / plain.tokens_per_s, 3) if plain.tokens_per_s else None,
            "tokens": plain.tokens,
            "requests": len(plain.outputs),
            "rounds": args.rounds,
            "identical_outputs": not differ,
            "first_difference": first_difference(mine[0].outputs[differ[0][0]], differ[0][1].outputs[differ[0][0]])
            if differ
            else None,
            "spec_decode_by_set": {k: v for k, v in ngram.spec_by_set.items() if v["drafted"]},
        }
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": model,
        "mode": "completion" if args.completion else "chat",
        "spec": json.loads(args.spec),
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "workloads": workloads,
        "identical_outputs": identical,
        "runs": [{k: v for k, v in asdict(r).items() if k != "outputs"} for r in runs],
    }


def first_difference(a: Output, b: Output) -> dict[str, Any]:
    """Where two outputs of the same request part (character offset and the texts around it)."""
    at = next(
        (i for i, (x, y) in enumerate(zip(a.text, b.text, strict=False)) if x != y), min(len(a.text), len(b.text))
    )
    return {"char": at, "plain": a.text[max(0, at - 40) : at + 40], "ngram": b.text[max(0, at - 40) : at + 40]}


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['model']} ({report['mode']}), {report['machine']}, {report['date']}")
    print(f"{'workload':8} {'plain tok/s':>12} {'ngram tok/s':>12} {'speed-up':>9} {'tokens':>7} identical")
    print(f"(speculative config {json.dumps(report['spec'])}, {report['max_tokens']} tokens per request)")
    for name, w in report["workloads"].items():
        print(
            f"{name:8} {w['plain_tokens_per_s']:12.2f} {w['ngram_tokens_per_s']:12.2f} {w['speedup']:9.3f}"
            f" {w['tokens']:7d} {w['identical_outputs']}"
        )
    for name, w in report["workloads"].items():
        for set_name, c in w["spec_decode_by_set"].items():
            rate = c["accepted"] / c["drafted"] if c["drafted"] else 0.0
            print(f"{name} on {set_name}: drafted {c['drafted']:.0f}, accepted {c['accepted']:.0f} ({rate:.0%})")


if __name__ == "__main__":
    sys.exit(main())
