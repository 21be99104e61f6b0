"""Serving benchmark: the same mixed-length workload against longrope-serve and stock vLLM, alternating.

Both servers run on this machine at the same time on the same model (only one receives traffic at a time);
rounds alternate A/B so drift (thermal, caches) hits both alike. Prompts are random token ids of exact
lengths sent to ``/v1/completions`` with streaming, so no tokenizer is needed here and both servers see
identical requests. Reports requests/s, token throughput, TTFT and latency percentiles, per-set counts
(from the ``x-longrope-factor-set`` header) and the throughput ratio this server ÷ stock.

Talks HTTP only; it starts the two servers as subprocesses (``longrope-serve`` and
``python -m vllm.entrypoints.openai.api_server``) unless given their URLs.

Length (≈470 lines): one benchmark — workload, A/B rounds, the hot-load under load and the report — whose
parts share one measurement record; split, each part would be read only with the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from server.protocol import FACTOR_SET_HEADER as HEADER

from .launch import default_model_path, free_port, launch, stop, wait_healthy

DEFAULT_SETS = Path(__file__).resolve().parent.parent / "server" / "default_sets"


@dataclass(frozen=True)
class Bucket:
    name: str
    min_len: int
    max_len: int
    weight: float


def parse_mix(text: str) -> list[Bucket]:
    """``short:32-512:0.5,medium:512-4096:0.4,long:8500-12000:0.1`` → buckets."""
    out = []
    for part in text.split(","):
        try:
            name, span, weight = part.split(":")
            lo, hi = (int(v) for v in span.split("-"))
            out.append(Bucket(name, lo, hi, float(weight)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad mix entry {part!r}; expected NAME:MIN-MAX:WEIGHT") from None
    return out


@dataclass(frozen=True)
class Job:
    bucket: str
    prompt: list[int]
    max_tokens: int


def make_workload(mix: list[Bucket], n: int, max_tokens: int, seed: int, vocab: tuple[int, int]) -> list[Job]:
    rng = random.Random(seed)
    weights = [b.weight for b in mix]
    jobs = []
    for _ in range(n):
        b = rng.choices(mix, weights)[0]
        length = rng.randint(b.min_len, b.max_len)
        jobs.append(Job(b.name, [rng.randrange(*vocab) for _ in range(length)], max_tokens))
    return jobs


@dataclass
class Result:
    bucket: str
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float | None = None
    latency: float | None = None
    factor_set: str | None = None
    error: str | None = None


async def run_job(client: httpx.AsyncClient, url: str, model: str, job: Job) -> Result:
    body = {
        "model": model,
        "prompt": job.prompt,
        "max_tokens": job.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = Result(job.bucket, len(job.prompt))
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            res.factor_set = resp.headers.get(HEADER)
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and res.ttft is None:
                    res.ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
        res.latency = time.perf_counter() - t0
    except httpx.HTTPError as err:
        res.error = f"{type(err).__name__}: {err}"
    return res


async def run_round(
    url: str, model: str, jobs: list[Job], concurrency: int, timeout: float, hot_load: HotLoad | None = None
) -> tuple[list[Result], float]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=timeout) as client:

        async def one(job: Job) -> Result:
            async with sem:
                return await run_job(client, url, model, job)

        t0 = time.perf_counter()
        tasks = [one(j) for j in jobs]
        if hot_load is not None:
            tasks.append(hot_load.run(client, url, model))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        return [r for r in results if isinstance(r, Result)], wall


@dataclass
class HotLoad:
    """Load a new version of a set in the middle of a round and time it: from the admin call to the
    response headers of the first request admitted on the new version (a streamed probe, sent
    repeatedly), while the round's traffic keeps running."""

    token: str
    set_json: dict[str, Any]
    delay_s: float = 5.0
    admin_call_s: float | None = None
    latency_s: float | None = None
    new_label: str | None = None
    probes: int = 0
    error: str | None = None

    async def run(self, client: httpx.AsyncClient, url: str, model: str) -> None:
        await asyncio.sleep(self.delay_s)
        auth = {"Authorization": f"Bearer {self.token}"}
        t0 = time.perf_counter()
        resp = await client.post(f"{url}/admin/factors", json=self.set_json, headers=auth)
        self.admin_call_s = time.perf_counter() - t0
        if resp.status_code != 201:
            self.error = f"admin load failed: HTTP {resp.status_code} {resp.text[:300]}"
            return
        self.new_label = resp.json()["data"][0]["label"]
        body = {"model": model, "prompt": [101] * 8, "max_tokens": 1, "stream": True}
        while time.perf_counter() - t0 < 120:
            self.probes += 1
            async with client.stream("POST", f"{url}/v1/completions", json=body) as probe:
                if probe.headers.get(HEADER) == self.new_label:
                    self.latency_s = time.perf_counter() - t0
                    await probe.aread()
                    return
                await probe.aread()
        self.error = f"no request was served on {self.new_label} within 120 s"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


@dataclass
class Summary:
    requests: int
    failed: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    per_set: dict[str, int] = field(default_factory=dict)


def summarise(rounds: list[tuple[list[Result], float]]) -> Summary:
    results = [r for rs, _ in rounds for r in rs]
    wall = sum(w for _, w in rounds)
    ok = [r for r in results if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)
    all_tokens = out_tokens + sum(r.prompt_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    lats = [r.latency for r in ok if r.latency is not None]
    return Summary(
        requests=len(results),
        failed=len(results) - len(ok),
        wall_s=wall,
        requests_per_s=len(ok) / wall,
        output_tokens_per_s=out_tokens / wall,
        total_tokens_per_s=all_tokens / wall,
        ttft_p50_s=pct(ttfts, 50),
        ttft_p99_s=pct(ttfts, 99),
        latency_p50_s=pct(lats, 50),
        latency_p99_s=pct(lats, 99),
        per_set=dict(Counter(r.factor_set or "-" for r in ok)),
    )


# -- servers ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m clients.bench",
        description="Mixed-length serving benchmark of longrope-serve against stock vLLM on the same model, alternating rounds.",
    )
    p.add_argument("--model", help="model folder (default: the embedded SmolLM2 default model)")
    p.add_argument(
        "--factors", nargs="*", default=None, help="factor files/folders for longrope-serve (default: its default sets)"
    )
    p.add_argument(
        "--mix",
        type=parse_mix,
        default=parse_mix("short:32-512:0.5,medium:512-3000:0.4,long:8400-9000:0.1"),
        help="NAME:MIN-MAX:WEIGHT,... prompt length buckets (tokens)",
    )
    p.add_argument("--requests", type=int, default=24, help="requests per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds per server (alternating)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request (ignore_eos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=32768, help="engine window for both servers")
    p.add_argument("--ours-url", help="use a running longrope-serve instead of starting one")
    p.add_argument("--stock-url", help="use a running stock vLLM server instead of starting one")
    p.add_argument("--served-model-name", default="bench-model")
    p.add_argument("--log-dir", type=Path, default=Path("out/bench"))
    p.add_argument("--json", type=Path, help="write the full report as JSON")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument(
        "--plot",
        type=Path,
        default=Path("out/bench/latency-by-length.png"),
        help="PNG of latency by prompt length per set",
    )
    p.add_argument("--no-hot-load", action="store_true", help="skip the hot-load timing in the last round")
    p.add_argument(
        "--hot-load-set", help="factor file to re-load during the last round (default: the smallest-window set)"
    )
    p.add_argument("--hot-load-delay", type=float, default=5.0, help="seconds into the last round before the hot-load")
    args = p.parse_args(argv)

    bindir = Path(sys.executable).parent
    args.model = args.model or default_model_path()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    token = os.environ.get("LONGROPE_ADMIN_TOKEN") or secrets.token_hex(16)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    factor_paths = args.factors or [str(DEFAULT_SETS)]
    hot_load = None
    if not args.no_hot_load and (args.ours_url is None or os.environ.get("LONGROPE_ADMIN_TOKEN")):
        hot_load = HotLoad(token, hot_load_body(args.hot_load_set, factor_paths), delay_s=args.hot_load_delay)
    common = [
        "--served-model-name",
        args.served_model_name,
        "--host",
        "127.0.0.1",
        "--max-num-seqs",
        str(max(args.concurrency, 8)),
    ]
    procs = []
    try:
        ours_url, stock_url = args.ours_url, args.stock_url
        if ours_url is None:
            port = free_port()
            cmd = [str(bindir / "longrope-serve"), "--model", args.model, "--port", str(port), *common]
            cmd += ["--factors", *factor_paths]
            procs.append(
                (
                    launch(cmd, args.log_dir / "longrope-serve.log", {**env, "LONGROPE_ADMIN_TOKEN": token}),
                    f"http://127.0.0.1:{port}",
                    args.log_dir / "longrope-serve.log",
                )
            )
            ours_url = procs[-1][1]
        if stock_url is None:
            port = free_port()
            overrides = json.dumps({"max_position_embeddings": args.max_model_len})
            cmd = [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                args.model,
                "--port",
                str(port),
                "--max-model-len",
                str(args.max_model_len),
                "--hf-overrides",
                overrides,
                *common,
            ]
            procs.append(
                (
                    launch(cmd, args.log_dir / "stock-vllm.log", env),
                    f"http://127.0.0.1:{port}",
                    args.log_dir / "stock-vllm.log",
                )
            )
            stock_url = procs[-1][1]
        for proc, url, log in procs:
            wait_healthy(url, proc, log)
        # one warm-up request each (first-request compile paths), with a prompt no round uses
        warmup = make_workload(args.mix[:1], 1, args.max_tokens, args.seed + 10_000, (100, 40000))
        for url in (ours_url, stock_url):
            asyncio.run(run_round(url, args.served_model_name, warmup, 1, args.timeout))
        ours_rounds, stock_rounds = [], []
        servers = [("longrope-serve", ours_url, ours_rounds), ("stock vLLM", stock_url, stock_rounds)]
        for r in range(args.rounds):
            # fresh prompts every round (identical for both servers), so the prefix cache helps neither
            # across rounds; the order alternates so neither server always goes first
            jobs = make_workload(args.mix, args.requests, args.max_tokens, args.seed + r, (100, 40000))
            for label, url, bucket in servers if r % 2 == 0 else servers[::-1]:
                hl = hot_load if (url == ours_url and r == args.rounds - 1) else None
                results, wall = asyncio.run(
                    run_round(url, args.served_model_name, jobs, args.concurrency, args.timeout, hl)
                )
                bucket.append((results, wall))
                print(
                    f"round {r + 1} {label}: {wall:.1f} s, {sum(x.error is not None for x in results)} failed",
                    file=sys.stderr,
                )
        ours, stock = summarise(ours_rounds), summarise(stock_rounds)
    finally:
        for proc, _, _ in procs:
            stop(proc)
    report = {
        "hot_load_latency_s": hot_load.latency_s if hot_load else None,
        "hot_load": asdict(hot_load) | {"token": "***", "set_json": None} if hot_load else None,
        "rope_state": rope_state(factor_paths),
        "throughput_ratio": ours.total_tokens_per_s / stock.total_tokens_per_s,
        "output_throughput_ratio": ours.output_tokens_per_s / stock.output_tokens_per_s,
        "failed_requests": ours.failed + stock.failed,
        "longrope_serve": asdict(ours),
        "stock_vllm": asdict(stock),
        "workload": {
            "mix": [asdict(b) for b in args.mix],
            "requests_per_round": args.requests,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
            "model": args.model,
            "max_model_len": args.max_model_len,
        },
    }
    print_table(report)
    if hot_load is not None:
        print(
            f"hot-load of {hot_load.new_label} under load: {hot_load.latency_s} s to the first request served on it"
            f" (admin call {hot_load.admin_call_s} s, {hot_load.probes} probe(s))"
            + (f"; {hot_load.error}" if hot_load.error else "")
        )
    if args.plot:
        plot_latency(ours_rounds, stock_rounds, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = report["failed_requests"] == 0 and (hot_load is None or hot_load.error is None)
    return 0 if ok else 1


def hot_load_body(path: str | None, factor_paths: list[str]) -> dict[str, Any]:
    """The set to re-load during the run (default: the smallest-window set served), without its version,
    so the server makes it the next version of that name."""
    from factors.formats import load_any, load_set_paths

    fs = min(load_set_paths(factor_paths), key=lambda c: c.max_len) if path is None else load_any(path)[0]
    body = fs.model_dump(mode="json", exclude_none=True)
    body.pop("version", None)
    body["provenance"] = {**body.get("provenance", {}), "notes": "re-loaded by the benchmark to time a hot-load"}
    return body


def plot_latency(ours: list[tuple[list[Result], float]], stock: list[tuple[list[Result], float]], path: Path) -> None:
    """PNG: request latency against prompt length, longrope-serve coloured by factor set, stock in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    stock_ok = [r for rs, _ in stock for r in rs if r.error is None]
    ax.scatter(
        [r.prompt_tokens for r in stock_ok],
        [r.latency for r in stock_ok],
        marker="x",
        color="grey",
        label="stock vLLM",
        alpha=0.6,
    )
    by_set: dict[str, list[Result]] = {}
    for rs, _ in ours:
        for r in rs:
            if r.error is None:
                by_set.setdefault(r.factor_set or "-", []).append(r)
    for label, rs in sorted(by_set.items()):
        ax.scatter([r.prompt_tokens for r in rs], [r.latency for r in rs], label=f"longrope-serve {label}", alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("request latency (s)")
    ax.set_title("Latency by prompt length and factor set")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def rope_state(paths: list[str]) -> dict[str, dict[str, int]]:
    """What each served set costs the server's RoPE (a few numbers per version, whatever the window)."""
    from factors.formats import load_set_paths
    from factors.geometry import slot_bytes

    return {fs.name: {"window": fs.max_len, "state_bytes": slot_bytes(fs.rotary_dim)} for fs in load_set_paths(paths)}


def print_table(report: dict[str, Any]) -> None:
    rows = [("", "longrope-serve", "stock vLLM")]
    a, b = report["longrope_serve"], report["stock_vllm"]

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    for key in (
        "requests",
        "failed",
        "wall_s",
        "requests_per_s",
        "total_tokens_per_s",
        "output_tokens_per_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "latency_p50_s",
        "latency_p99_s",
    ):
        rows.append((key, f(a[key]), f(b[key])))
    rows.append(("per_set", json.dumps(a["per_set"]), json.dumps(b["per_set"])))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(width[i]) for i, c in enumerate(r)))
    print(f"throughput ratio (total tokens/s, longrope-serve ÷ stock): {report['throughput_ratio']:.3f}")
    print(f"output-token throughput ratio: {report['output_throughput_ratio']:.3f}")
    for name, mem in report["rope_state"].items():
        print(f"RoPE state of {name}: window {mem['window']}, {mem['state_bytes']} bytes")


if __name__ == "__main__":
    sys.exit(main())
