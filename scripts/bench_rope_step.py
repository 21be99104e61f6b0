"""Per-step RoPE cost beside the engine step it belongs to.

1. ``StepRope.fill`` (what a worker runs once per step, before the forward) for 1, 256 and 8,192 scheduled
   tokens, rotary_dim 64 and 128, on one thread (vLLM's CPU worker runs one OpenMP thread on 2 cores).
2. The step time of the same batch in a real longrope-serve engine on the embedded SmolLM2-135M (bf16,
   torch.compile'd as served, --max-num-batched-tokens 8192 so 8,192 prompt tokens are one step): a decode
   step (one running request), a 256-token prefill and an 8,192-token prefill.

    .venv/bin/python scripts/bench_rope_step.py [--json out/bench/rope-step.json] [--no-engine]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from factors.baselines import RopeGeometry, yarn_set
from factors.rope import StepRope

TOKENS = (1, 256, 8192)
DIMS = (64, 128)


def fill_ms(rotary_dim: int, tokens: int, repeats: int) -> float:
    geo = RopeGeometry(rotary_dim=rotary_dim, rope_theta=10000.0, original_max_len=4096)
    step = StepRope(rotary_dim)
    for slot, window in enumerate((8192, 32768, 2_097_152)):
        step.put(slot, yarn_set(geo, window, name=f"s{slot}"))
    out = torch.empty(tokens, rotary_dim, dtype=torch.bfloat16)
    positions = torch.randint(0, 2_000_000, (tokens,))
    slots = torch.randint(0, 3, (tokens,))
    step.fill(out, positions, slots)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step.fill(out, positions, slots)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


async def engine_steps_ms() -> dict[str, float]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # as longrope-serve sets it (vLLM would take 90 %)
    from vllm import SamplingParams

    from server.app import DEFAULT_SETS_DIR
    from server.default_model import ensure_default_model
    from server.engine import EngineSettings, LongRopeEngine

    settings = EngineSettings(
        model=str(ensure_default_model()),
        factor_paths=[str(DEFAULT_SETS_DIR)],
        engine_kwargs={"max_num_batched_tokens": 8192, "max_num_seqs": 8, "enable_prefix_caching": False},
    )
    engine = await LongRopeEngine.start(settings)
    rng = random.Random(0)

    async def timed(n_prompt: int, n_out: int, rid: str) -> tuple[float, float]:
        ids = [rng.randrange(100, 40000) for _ in range(n_prompt)]
        params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        t0, first = time.perf_counter(), None
        async for out in engine.generate({"prompt_token_ids": ids}, params, rid):
            if first is None and out.outputs and out.outputs[0].token_ids:
                first = time.perf_counter()
        return (first or time.perf_counter()) - t0, time.perf_counter() - t0

    try:
        await timed(300, 4, "warm-1")
        await timed(8192, 1, "warm-2")
        decode = []
        for k in range(3):
            ttft, total = await timed(256, 65, f"decode-{k}")
            decode.append((total - ttft) / 64)
        p256 = statistics.median([(await timed(256, 1, f"p256-{k}"))[0] for k in range(5)])
        p8k = statistics.median([(await timed(8192, 1, f"p8k-{k}"))[0] for k in range(3)])
    finally:
        engine.shutdown()
    return {"1": statistics.median(decode) * 1e3, "256": p256 * 1e3, "8192": p8k * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--no-engine", action="store_true", help="only the fill microbenchmark")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fills = {d: {t: fill_ms(d, t, 200 if t < 8192 else 30) for t in TOKENS} for d in DIMS}
    steps = None if args.no_engine else asyncio.run(engine_steps_ms())
    print(
        f"{'tokens':>8} | "
        + " | ".join(f"fill rd={d} (ms)" for d in DIMS)
        + (" | SmolLM2 step (ms) | share" if steps else "")
    )
    for t in TOKENS:
        row = f"{t:>8} | " + " | ".join(f"{fills[d][t]:>15.3f}" for d in DIMS)
        if steps:
            step = steps[str(t)]
            row += f" | {step:>17.1f} | " + " / ".join(f"{100 * fills[d][t] / step:.2f} %" for d in DIMS)
        print(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"threads": args.threads, "fill_ms": fills, "step_ms": steps}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
