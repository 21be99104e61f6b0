"""Measure effective context for docs/effective-context.md: RULER-style accuracy and held-out perplexity of
the retrieval fixture without fine-tuning (per-ratio sets) and after ``extend`` (fine-tuned sets, YaRN-FT
beside), and SmolLM2 with the english template. Each step writes JSON records (relabelled by method, so one
heatmap spans the lengths of per-ratio sets); ``table`` turns them into markdown and heatmaps.

    python scripts/effective_context.py noft  --sets DIR --out out/effective
    python scripts/effective_context.py ft    --run DIR --out out/effective
    python scripts/effective_context.py table --out out/effective --png-dir DIR

Everything runs offline with the evaluator's exact angles (``factors.evaluation.ruler.predict_offline``), on
haystack and text of kinds the fixture never trained on (``licenses`` and ``copyright``, held-out split).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from clients.side_by_side import model_sets
from factors.evaluation.evaluator import Evaluator
from factors.evaluation.ruler import ANSWER_ROOM, answer_budget, load_haystack, plain_set, predict_offline, records
from factors.evaluation.tasks import make_suite
from factors.formats import load_any, read_model_rope
from factors.schema import FactorSet
from factors.search.progressive import text_tokens
from server.policy import AdmissionPolicy, RequestTooLong, SetTable

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "factors" / "data" / "tiny-retrieval" / "model"
TEXT = "licenses:heldout+copyright:heldout"
METHODS = ("plain", "pi", "ntk", "yarn", "lr-ppl", "lr-needle")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def relabel(recs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [{**r, "set": name} for r in recs]


def suite(tasks: list[str], length: int, samples: int, seed: int = 0, depths: int = 11) -> list:
    return make_suite(tasks, [length], depths, samples, load_haystack(TEXT), seed)


def measure(ev: Evaluator, fs: FactorSet, prompts: list, label: str) -> list[dict[str, Any]]:
    t0 = time.monotonic()
    recs = relabel(records(predict_offline(ev, fs, prompts)), label)
    log(f"{label} {fs.name} {prompts[0].length}: {len(prompts)} prompts in {time.monotonic() - t0:.0f} s")
    return recs


def ppl(ev: Evaluator, fs: FactorSet | None, tokens: Any, length: int, samples: int, label: str) -> dict[str, Any]:
    w = ev.windows(tokens, length, samples, seed=1)
    value = ev.perplexity(fs, w)
    log(f"ppl {label} {length}: {value:.4f}")
    return {"set": label, "length": length, "ppl": value, "windows": samples}


def cmd_noft(args: argparse.Namespace) -> None:
    """Per-ratio sets at 2×, 4×, 8× on the base fixture: RULER niah_single + multikey and held-out ppl."""
    ev = Evaluator(BASE, threads=args.threads)
    w = read_model_rope(BASE).geometry.original_max_len
    tokens = text_tokens(ev, TEXT)
    recs, ppls = [], []
    for ratio in (2, 4, 8):
        n = ratio * w
        prompts = suite(["niah_single", "niah_multikey"], n - ANSWER_ROOM, args.samples)
        for method in METHODS:
            fs = plain_set(ev) if method == "plain" else load_any(args.sets / f"{method}-{n}.json")[0]
            recs += measure(ev, fs, prompts, method)
            ppls.append(ppl(ev, None if method == "plain" else fs, tokens, n, args.ppl_windows, method))
    (args.out / "noft-ruler.json").write_text(json.dumps(recs, indent=0))
    (args.out / "noft-ppl.json").write_text(json.dumps(ppls, indent=0))


def routed(sets: list[FactorSet], need: int) -> FactorSet:
    """longrope-serve's automatic routing (``server.policy``, policy ``reserve``): the smallest set whose window
    holds ``need`` tokens, prompt and answer; past the largest window, where the server refuses, the largest
    set (measured past its target)."""
    try:
        return AdmissionPolicy().assign(SetTable(tuple(sets)), need - 1, 1, "reserve").set
    except RequestTooLong:
        return max(sets, key=lambda fs: fs.max_len)


def cmd_ft(args: argparse.Namespace) -> None:
    """After extend: each fine-tuned model under its routed sets at every length, and in the window (every
    task) under its short tier; with --base the base fixture in the window under plain RoPE."""
    w = read_model_rope(BASE).geometry.original_max_len
    recs, ppls = [], []
    inwin = suite(["niah_single", "niah_multikey", "niah_multivalue", "vt"], w - ANSWER_ROOM, args.samples)
    stem = "ft-" + "-".join([*(["base"] if args.base else []), *(label for label, _ in args.model)])

    def save() -> None:
        (args.out / f"{stem}-ruler.json").write_text(json.dumps(recs, indent=0))
        (args.out / f"{stem}-ppl.json").write_text(json.dumps(ppls, indent=0))

    if args.base:
        base = Evaluator(BASE, threads=args.threads)
        recs += measure(base, plain_set(base), inwin, "base")
        ppls.append(ppl(base, None, text_tokens(base, TEXT), w, args.ppl_windows * 8, "base"))
        save()
    for label, folder in args.model:
        ev = Evaluator(folder, threads=args.threads)
        sets = model_sets(folder)
        if sets[0].max_len > w:  # no short tier (YaRN-FT): the window is served with the model's own RoPE
            sets.insert(0, plain_set(ev))
        tokens = text_tokens(ev, TEXT)
        short = routed(sets, w)  # the short tier (the fine-tuned model's readjusted set; plain for YaRN-FT)
        recs += measure(ev, short, inwin, label)
        ppls.append(ppl(ev, short, tokens, w, args.ppl_windows * 8, label))
        if short.factors != plain_set(ev).factors or short.n_hat or short.resolved_mscale != 1.0:
            # and the fine-tuned weights under the model's own RoPE
            recs += measure(ev, plain_set(ev), inwin, f"{label} (plain)")
            ppls.append(ppl(ev, plain_set(ev), tokens, w, args.ppl_windows * 8, f"{label} (plain)"))
        save()
        for n in args.lengths:
            fs = routed(sets, n)
            # past 8W --long-samples, fewer again past 32W: one 32k prompt takes half a minute on a core
            k = args.samples if n <= 8 * w else max(1, args.long_samples * 8192 // max(n, 8192))
            tasks = ["niah_single", "niah_multikey"] if n <= 16384 else ["niah_single"]
            prompts = suite(tasks, n - ANSWER_ROOM, k)
            assert all(p.length + answer_budget(p.answer) <= max(n, fs.max_len) for p in prompts)
            recs += measure(ev, fs, prompts, label)
            ppls.append(ppl(ev, fs, tokens, n, max(2, args.ppl_windows * 2048 // n), label))
            save()


def cmd_table(args: argparse.Namespace) -> None:
    """Markdown tables (mean over depths, lowest depth) and heatmaps of the records in --out."""
    from factors.evaluation.heatmap import plot_heatmaps

    for stem in ("noft", "ft"):
        files = sorted(args.out.glob(f"{stem}-ruler.json" if stem == "noft" else "ft-*-ruler.json"))
        if not files:
            continue
        recs = [r for f in files for r in json.loads(f.read_text())]
        cells: dict[tuple[str, str, int], list[float]] = {}
        for r in recs:
            cells.setdefault((r["set"], r["task"], r["length"]), []).append(r["accuracy"])
        lengths = sorted({k[2] for k in cells})
        print(f"\n### {stem}: accuracy, mean over depths (lowest depth)\n")
        print("| set | task | " + " | ".join(map(str, lengths)) + " |")
        print("|---|---|" + "---:|" * len(lengths))
        for s, t in dict.fromkeys((k[0], k[1]) for k in cells):
            vals = [cells.get((s, t, n)) for n in lengths]
            row = ["–" if v is None else f"{sum(v) / len(v):.2f} ({min(v):.2f})" for v in vals]
            print(f"| {s} | {t} | " + " | ".join(row) + " |")
        if args.png_dir:
            args.png_dir.mkdir(parents=True, exist_ok=True)
            shown = [r for r in recs if r["task"] == "niah_single" and "not shipped" not in r["set"]]
            plot_heatmaps(shown, args.png_dir / f"{stem}-niah_single.png")
        pfiles = sorted(args.out.glob(f"{stem}-ppl.json" if stem == "noft" else "ft-*-ppl.json"))
        if pfiles:
            pp = [r for f in pfiles for r in json.loads(f.read_text())]
            lens = sorted({r["length"] for r in pp})
            by = {(r["set"], r["length"]): r["ppl"] for r in pp}
            print(f"\n### {stem}: held-out perplexity\n")
            print("| set | " + " | ".join(map(str, lens)) + " |")
            print("|---|" + "---:|" * len(lens))
            for s in dict.fromkeys(r["set"] for r in pp):
                print(f"| {s} | " + " | ".join(f"{by[(s, n)]:.3f}" if (s, n) in by else "–" for n in lens) + " |")


def labelled(text: str) -> tuple[str, Path]:
    label, _, folder = text.partition("=")
    return label, Path(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(required=True)
    a = sub.add_parser("noft")
    a.add_argument("--sets", type=Path, required=True, help="folder of METHOD-LENGTH.json sets")
    a.set_defaults(func=cmd_noft)
    b = sub.add_parser("ft")
    b.add_argument("--model", type=labelled, action="append", default=[], help="LABEL=DIR of a fine-tuned model")
    b.add_argument("--base", action="store_true", help="also the base fixture in the window")
    b.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8192, 16384, 32768])
    b.add_argument(
        "--long-samples", type=int, default=4, help="prompts per task and depth past 8W (halved per doubling past 32W)"
    )
    b.set_defaults(func=cmd_ft)
    c = sub.add_parser("table")
    c.add_argument("--png-dir", type=Path)
    c.set_defaults(func=cmd_table)
    for q in (a, b, c):
        q.add_argument("--out", type=Path, required=True)
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--samples", type=int, default=4, help="prompts per task, length and depth")
        q.add_argument("--ppl-windows", type=int, default=8, help="held-out windows at 8W (more when shorter)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()
