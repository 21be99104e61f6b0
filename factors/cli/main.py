"""``longrope-factors``: inspect, validate, convert, generate and plot LongRoPE factor sets.

Length (≈315 lines): most of it is the argparse help of six commands, kept beside the commands it explains.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from factors.baselines import BASELINE_METHODS, make_baseline
from factors.cli.args import DTYPES, add_geometry_options, geometry_from_args, int_list
from factors.cli.extend import add_extend_commands
from factors.cli.ruler import add_ruler_command
from factors.cli.search import add_search_commands
from factors.evaluation.plotting import save_figure
from factors.formats import (
    atomic_write_text,
    check_compatible,
    factor_set_json,
    hf_config_from_sets,
    load_any,
    longrope_csv,
    read_model_rope,
)
from factors.geometry import slot_bytes
from factors.rope import cos_sin
from factors.schema import FactorSet, FactorSetError

DESCRIPTION = """\
Work with LongRoPE factor sets: the per-frequency rescale factors λ_i, the number n̂ of leading
positions that keep the original RoPE angles, and the attention scale mscale, for one window.

Input files may be the project's JSON (one set), a Hugging Face config.json with a `longrope`
rope block (gives two sets: short and long), or a LongRoPE CSV of λ_i (needs --model or the
geometry options, and --max-len, because a CSV carries only the factors)."""

EPILOG = """\
examples:
  longrope-factors show long-64k.json
  longrope-factors validate sets/*.json --model ./models/smollm2
  longrope-factors convert phi3/config.json --to json -o sets/
  longrope-factors convert 8k.csv --model ./models/smollm2 --max-len 65536 --to json -o long.json
  longrope-factors baseline yarn --model ./models/smollm2 --target-len 65536 -o yarn-64k.json
  longrope-factors plot a.json b.json -o factors.png
  longrope-factors angles long-64k.json --positions 0,1,4095,2097151 --json
  longrope-factors search --model factors/data/tiny-short/model --target-len 1024 -o longrope.json
  longrope-factors eval --model DIR --set a.json --set b.json --text stdlib:heldout --lengths 1024,2048 --json
  longrope-factors passkey --model DIR --set long.json --lengths 4096
  longrope-factors plot-ppl --model DIR --set a.json --text stdlib:heldout --lengths 128,256,512,1024 -o ppl.png
  longrope-factors finetune --model DIR --set long-8k.json --steps 200 -o finetuned/
  longrope-factors extend --model DIR --target-len 1024 --next-target 8192 --compare yarn --out run/"""


FILES_HELP = "factor files: project JSON, HF config.json, or LongRoPE CSV (with the geometry options)"


def _load(args: argparse.Namespace, path: str) -> list[FactorSet]:
    monotone = "reject" if getattr(args, "strict_monotone", False) else "warn"
    if path.lower().endswith(".csv"):
        geo = geometry_from_args(args, required=True)
        return load_any(
            path,
            monotone=monotone,
            geometry=geo,
            max_len=getattr(args, "max_len", None),
            name=getattr(args, "name", None),
            n_hat=getattr(args, "n_hat", 0),
            mscale=getattr(args, "mscale", None),
        )
    return load_any(path, monotone=monotone)


def _summary(fs: FactorSet) -> dict[str, Any]:
    return {**fs.summary(), "rope_state_bytes": slot_bytes(fs.rotary_dim)}


def cmd_show(args: argparse.Namespace) -> int:
    sets = [fs for path in args.files for fs in _load(args, path)]
    if args.json:
        print(json.dumps([_summary(fs) for fs in sets], indent=2))
        return 0
    for fs in sets:
        s = _summary(fs)
        lam = s["factors"]
        print(f"{fs.label}: window {fs.max_len} tokens ({s['scale']:g}× of {fs.original_max_len})")
        print(
            f"  rotary_dim {fs.rotary_dim}, rope_theta {fs.rope_theta:g}, n̂ {fs.n_hat}, mscale {fs.resolved_mscale:.6f}"
        )
        print(
            f"  λ: {lam['count']} values, {lam['min']:.4g} … {lam['max']:.4g}"
            + ("" if s["monotone"] else " (NOT monotone)")
        )
        print(
            f"  served RoPE state: {s['rope_state_bytes']} bytes per version, whatever the window (the server"
            " computes each step's cos/sin from these; no table)"
        )
        print(
            f"  provenance: {fs.provenance.method}" + (f" from {fs.provenance.source}" if fs.provenance.source else "")
        )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    model = read_model_rope(args.model) if args.model else None
    failed = 0
    for path in args.files:
        try:
            sets = _load(args, path)
            for fs in sets:
                if model is not None:
                    check_compatible(fs, model)
            print(f"ok   {path}: " + ", ".join(f"{fs.name} (window {fs.max_len})" for fs in sets))
        except FactorSetError as err:
            failed += 1
            print(f"FAIL {path}: {err}", file=sys.stderr)
    return 1 if failed else 0


def cmd_convert(args: argparse.Namespace) -> int:
    sets = _load(args, args.input)
    out = Path(args.output) if args.output else None
    if args.to == "hf-config":
        if len(sets) != 2:
            if args.long is None:
                raise FactorSetError("--to hf-config needs a short and a long set: give an HF config, or --long FILE")
        short, long = (sets[0], sets[1]) if len(sets) == 2 else (sets[0], _load(args, args.long)[0])
        text = json.dumps(hf_config_from_sets(short, long, key=args.hf_key), indent=2) + "\n"
        return _emit(text, out)
    if args.to == "csv":
        if len(sets) != 1:
            raise FactorSetError(f"{args.input} holds {len(sets)} sets; a CSV holds one (convert to json first)")
        return _emit(longrope_csv(sets[0]), out)
    if len(sets) == 1 and (out is None or out.suffix == ".json"):
        return _emit(factor_set_json(sets[0]), out)
    if out is None:
        print(json.dumps([json.loads(factor_set_json(fs)) for fs in sets], indent=2))
        return 0
    for fs in sets:
        target = out / f"{fs.name}.json"
        atomic_write_text(target, factor_set_json(fs))
        print(f"wrote {target}", file=sys.stderr)
    return 0


def _emit(text: str, out: Path | None) -> int:
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(out, text)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    geo = geometry_from_args(args, required=True)
    assert geo is not None
    fs = make_baseline(args.method, geo, args.target_len, name=args.name)
    return _emit(factor_set_json(fs), Path(args.output) if args.output else None)


def cmd_plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [fs for path in args.files for fs in _load(args, path)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for fs in sets:
        ax.plot(range(len(fs.factors)), fs.factors, marker=".", label=f"{fs.label} ({fs.max_len} tok, n̂={fs.n_hat})")
    ax.set_xlabel("frequency index i (0 = fastest rotation)")
    ax.set_ylabel("rescale factor λ_i")
    ax.set_yscale("log" if args.log else "linear")
    ax.set_title(args.title or "LongRoPE factors")
    ax.grid(True, alpha=0.3)
    return save_figure(fig, ax, args.output)


def cmd_angles(args: argparse.Namespace) -> int:
    sets = _load(args, args.file)
    fs = sets[0] if args.set is None else next((s for s in sets if s.name == args.set), None)
    if fs is None:
        raise FactorSetError(f"{args.file} has no set named {args.set!r}; it has {', '.join(s.name for s in sets)}")
    if len(sets) > 1 and args.set is None:
        print(f"note: {args.file} holds {len(sets)} sets; showing {fs.name!r} (choose with --set)", file=sys.stderr)
    beyond = [p for p in args.positions if p >= fs.max_len]
    if beyond:
        print(f"note: positions {beyond} are beyond the set's window ({fs.max_len})", file=sys.stderr)
    import torch

    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype
    ]
    c, s = cos_sin(fs, args.positions, dtype=dtype)
    record = {"set": fs.label, "positions": args.positions, "cos": c.double().tolist(), "sin": s.double().tolist()}
    if args.json:
        print(json.dumps(record))
    else:
        for i, p in enumerate(args.positions):
            print(f"position {p}: cos[0..3]={record['cos'][i][:4]} sin[0..3]={record['sin'][i][:4]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longrope-factors",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "show",
        help="summarise factor sets",
        description="Print window, λ range, n̂, mscale, table memory and provenance of each set.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help=FILES_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_geometry_options(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "validate",
        help="check factor files (exit 1 if any is bad)",
        description="Check each file against the schema (count = rotary_dim/2, finite, ≥ 1, n̂ < max_len, ...) and, with --model, against the model's rotary_dim, rope_theta, original window and fingerprint.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help=FILES_HELP)
    p.add_argument(
        "--strict-monotone", action="store_true", help="reject λ that decrease with the frequency index (default: warn)"
    )
    add_geometry_options(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "convert",
        help="convert between json, LongRoPE csv and HF config",
        description="Convert a set between formats. --to json writes one file, or one file per set into the folder -o names (an HF config holds two sets). --to hf-config needs a short and a long set. --to csv writes λ_i as one row.",
    )
    p.add_argument("input", metavar="FILE", help="the file to convert (JSON, HF config.json or CSV)")
    p.add_argument("--to", choices=["json", "csv", "hf-config"], required=True, help="output format")
    p.add_argument("-o", "--output", help="output file (or folder for several sets); default stdout")
    p.add_argument("--long", metavar="FILE", help="with --to hf-config and a single input set: the long set")
    p.add_argument(
        "--hf-key",
        choices=["rope_parameters", "rope_scaling"],
        default="rope_parameters",
        help="config key of the rope block (transformers ≥ 5 reads rope_parameters; older rope_scaling)",
    )
    add_geometry_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "baseline",
        help="generate a PI / NTK / YaRN / identity set",
        description="Generate a hand-designed extension as a factor set, with the formulas of Hugging Face's linear, dynamic (NTK) and yarn rope types.",
    )
    p.add_argument(
        "method", choices=BASELINE_METHODS, metavar="METHOD", help="the rule: " + ", ".join(BASELINE_METHODS)
    )
    p.add_argument("--target-len", type=int, required=True, help="window the set should serve (tokens)")
    p.add_argument("--name", help="set name (default METHOD-TARGET)")
    p.add_argument("-o", "--output", help="output JSON file (default stdout)")
    add_geometry_options(p, for_csv=False)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser(
        "plot",
        help="PNG of λ_i against frequency index, several sets overlaid",
        description="Draw λ_i against the frequency index i (0 = fastest rotation), one line per set.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help=FILES_HELP)
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--log", action="store_true", help="log-scale λ axis")
    p.add_argument("--title", help="plot title (default: LongRoPE factors)")
    add_geometry_options(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "angles",
        help="cos/sin a set applies at given positions",
        description="Print, per position, the rotary_dim/2 cos and sin values exactly as the server applies them (n̂ and mscale included), computed in float64 and cast to --dtype.",
    )
    p.add_argument("file", metavar="FILE", help="factor file (JSON, HF config.json or CSV)")
    p.add_argument(
        "--positions",
        type=int_list(minimum=0, what="positions"),
        required=True,
        help="comma-separated positions ≥ 0, e.g. 0,1,4095,2097151",
    )
    p.add_argument("--set", help="which set of a multi-set file (e.g. long for an HF config)")
    p.add_argument(
        "--dtype",
        choices=["float64", *DTYPES],
        default="float32",
        help="dtype the values are cast to, as the server casts them to the model's (default float32)",
    )
    p.add_argument("--json", action="store_true", help='print {"positions": [...], "cos": [[...]], "sin": [[...]]}')
    add_geometry_options(p)
    p.set_defaults(func=cmd_angles)
    add_search_commands(sub)
    add_extend_commands(sub)
    add_ruler_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except FactorSetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
