"""Eight tiers 4k … 2048k on a head_dim-128 model, as a new user would run them.

Starts two real longrope-serve processes on a tiny random head_dim-128 Llama (bf16, original window 4,096,
8,192 tokens per step): A with eight tiers (4k, 8k, 16k, 32k, 256k, 512k, 1024k, 2048k — the windows of
microsoft/LongRoPE's LLaMA-2 sets; here YaRN sets for each window), B with only 4k and 2048k. Checks that
requests of 3,000 / 4,097 / 12,000 / 30,000 / 40,000 tokens land on the smallest tier holding them, times
five back-to-back 2048k hot-loads on A, and compares the memory (RSS, whole process tree) of A after the
loads with B's.

    .venv/bin/python scripts/check_tiers.py [--json out/bench/tiers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from clients.launch import free_port, launch, stop, wait_healthy  # noqa: E402
from factors.baselines import RopeGeometry, identity_set, yarn_set  # noqa: E402
from factors.formats import save_json_set  # noqa: E402
from server.protocol import FACTOR_SET_HEADER  # noqa: E402

TOKEN = "check-tiers-token"
TIERS = {"4k": 4096, "8k": 8192, "16k": 16384, "32k": 32768, "256k": 262144, "512k": 524288}
TIERS |= {"1024k": 1048576, "2048k": 2097152}
PROMPTS = {3000: "4k", 4097: "8k", 12000: "16k", 30000: "32k", 40000: "256k"}


def make_model(folder: Path) -> Path:
    import torch
    from tiny_models import TINY, _save
    from transformers import LlamaConfig, LlamaForCausalLM

    from server.default_model import ensure_default_model

    torch.manual_seed(0)
    cfg = {**TINY, "hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "dtype": "bfloat16"}
    model = LlamaForCausalLM(LlamaConfig(**cfg, max_position_embeddings=4096, rope_theta=10000.0))
    return _save(model.to(torch.bfloat16), folder, ensure_default_model())


def write_sets(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    geo = RopeGeometry(rope_theta=10000.0, rotary_dim=128, original_max_len=4096)
    for name in names:
        window = TIERS[name]
        fs = identity_set(geo, name, window) if window == 4096 else yarn_set(geo, window, name=name)
        save_json_set(fs, folder / f"{name}.json")
    return folder


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--log-dir", type=Path, default=Path("out/tiers"))
    args = p.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tiers-"))
    model = make_model(work / "model")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "3", "LONGROPE_ADMIN_TOKEN": TOKEN}
    servers = {}
    for label, names in (("eight", list(TIERS)), ("two", ["4k", "2048k"])):
        port = free_port()
        cmd = [str(bindir / "longrope-serve"), "--model", str(model), "--port", str(port), "--host", "127.0.0.1"]
        cmd += ["--factors", str(write_sets(work / f"sets-{label}", names)), "--registry", str(work / f"reg-{label}")]
        cmd += ["--max-num-batched-tokens", "8192", "--max-num-seqs", "4", "--served-model-name", "tiny"]
        log = args.log_dir / f"server-{label}.log"
        servers[label] = (launch(cmd, log, env), f"http://127.0.0.1:{port}", log)
    report: dict = {"landing": {}, "hot_load_s": []}
    try:
        for proc, url, log in servers.values():
            wait_healthy(url, proc, log)
        _, url, _ = servers["eight"]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        rng = random.Random(0)
        ok = True
        for n, want in PROMPTS.items():
            ids = [rng.randrange(100, 40000) for _ in range(n)]
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 1}, timeout=900)
            got = r.headers.get(FACTOR_SET_HEADER, "")
            report["landing"][n] = {"set": got, "status": r.status_code, "seconds": round(time.monotonic() - t0, 2)}
            ok &= r.status_code == 200 and got == f"{want}@1"
            print(f"{n} tokens -> {got} ({r.status_code}, {time.monotonic() - t0:.1f} s)", file=sys.stderr)
        body = json.loads((work / "sets-eight" / "2048k.json").read_text())
        body.pop("version", None)
        for k in range(5):
            t0 = time.monotonic()
            r = httpx.post(f"{url}/admin/factors", json=body, headers=auth, timeout=60)
            report["hot_load_s"].append(round(time.monotonic() - t0, 4))
            ok &= r.status_code == 201
            print(f"2048k hot-load {k + 1}: {r.status_code} in {report['hot_load_s'][-1]} s", file=sys.stderr)
        ids = [rng.randrange(100, 40000) for _ in range(200)]
        # reserve with a budget past 1024k lands on 2048k; streamed, so the header names the set at once and
        # closing the stream aborts the request
        xargs = {"longrope_policy": "reserve"}
        body = {"model": "tiny", "prompt": ids, "max_tokens": 1_500_000, "stream": True, "vllm_xargs": xargs}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            report["after_loads"] = r.headers.get(FACTOR_SET_HEADER)
        ok &= report["after_loads"] == "2048k@6"
        time.sleep(3)
        for label, (proc, url, _) in servers.items():
            listing = httpx.get(f"{url}/admin/factors", headers=auth, timeout=30).json()
            report[label] = {"rss_mib": round(tree_rss(proc.pid) / 2**20, 1), "rope": listing["rope"]}
        report["rss_difference_mib"] = round(report["eight"]["rss_mib"] - report["two"]["rss_mib"], 1)
        ok &= abs(report["rss_difference_mib"]) <= 256 and max(report["hot_load_s"]) < 1.0
        report["ok"] = bool(ok)
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
