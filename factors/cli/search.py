"""``longrope-factors search | eval | passkey | plot-ppl``: find and measure factor sets.

These commands load a Hugging Face model (transformers, CPU or CUDA); they never import vLLM.

Length (≈350 lines): most of it is the argparse help of four commands, kept beside the commands it explains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from factors.baselines import BASELINE_METHODS
from factors.cli.args import (
    DefaultsHelpFormatter,
    add_model_options,
    critical_dim,
    float_list,
    int_list,
    name_list,
)
from factors.evaluation.tasks import TASKS
from factors.formats import factor_set_json, load_any, read_model_rope, save_json_set
from factors.schema import FactorSet, FactorSetError
from factors.search.critical import CRITICAL_CHOICES_HELP, resolve_critical_pair
from factors.search.evolution import N_HAT_CHOICES, SearchConfig, SearchPlan
from factors.search.objective import DEFAULT_NEEDLE_TASKS, OBJECTIVES

DEFAULT_TEXT = "stdlib:search"

TEXT_HELP = (
    "text to measure on: a UTF-8 file, or stdlib:search / stdlib:heldout / stdlib:train for the Python"
    " standard library's source split by file (see factors.evaluation.corpus)"
)


def _evaluator(args: argparse.Namespace) -> Any:
    from factors.evaluation.evaluator import Evaluator

    return Evaluator(args.model, device=args.device, dtype=args.dtype, threads=args.threads)


def _sets(paths: list[str]) -> list[FactorSet]:
    return [fs for path in paths for fs in load_any(path)]


def _tokens(ev: Any, spec: str) -> Any:
    from factors.search.progressive import text_tokens

    return text_tokens(ev, spec)


def _print_table(records: list[dict[str, Any]]) -> None:
    lengths = sorted({r["length"] for r in records})
    names = list(dict.fromkeys(r["set"] for r in records))
    by = {(r["set"], r["length"]): r["ppl"] for r in records}
    width = max(12, *(len(n) for n in names))
    print(f"{'set':<{width}} " + " ".join(f"{L:>10}" for L in lengths))
    for n in names:
        print(f"{n:<{width}} " + " ".join(f"{by.get((n, L), float('nan')):>10.4f}" for L in lengths))


# -- search ---------------------------------------------------------------------------------------


def search_plan(args: argparse.Namespace) -> SearchPlan:
    """The SearchPlan of ``longrope-factors search`` options (checked before any model is loaded)."""
    budget = {
        "population": args.population,
        "parents": args.parents,
        "mutations": args.mutations,
        "crossovers": args.crossovers,
        "generations": args.generations,
        "seed": args.seed,
        "n_hat_choices": tuple(args.n_hat_choices),
    }
    geometry = read_model_rope(args.model).geometry
    try:
        critical = resolve_critical_pair(args.critical_dim, geometry)
    except ValueError as err:
        raise FactorSetError(f"search: {err}") from None
    long = SearchConfig(
        target_len=args.target_len,
        **budget,
        low=args.low,
        high=args.high,
        mscale=args.mscale,
        seed_methods=tuple(args.seed_methods),
        time_budget_s=args.time_budget * 60 if args.time_budget else None,
        critical_pair=critical,
    )
    short = None
    if args.short:
        short = SearchConfig(
            target_len=geometry.original_max_len,
            **(
                budget
                | {
                    "population": args.short_population or args.population,
                    "parents": args.short_parents or args.parents,
                    "generations": args.generations if args.short_generations is None else args.short_generations,
                }
            ),
        )
    try:
        return SearchPlan(
            long=long,
            text=",".join(args.text) if args.text else DEFAULT_TEXT,
            samples=args.samples,
            window_seed=args.window_seed,
            stages=tuple(args.progressive or ()),
            name=args.name,
            short=short,
            short_samples=args.short_samples,
            checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
            resume=args.resume,
            progress=not args.no_progress,
            table_text=args.table_text,
            table_samples=args.table_samples,
            table_baselines=tuple(args.table_baselines),
            seed_sets=tuple(_sets(args.seed_set)),
            objective=args.objective,
            needle_tasks=tuple(args.needle_tasks),
            needle_depths=args.needle_depths,
            needle_samples=args.needle_samples,
            needle_template=args.needle_template,
        )
    except ValueError as err:
        raise FactorSetError(f"search: {err}") from None


def cmd_search(args: argparse.Namespace) -> int:
    from factors.search.progressive import run_search

    plan = search_plan(args)
    ev = _evaluator(args)
    t0 = time.monotonic()
    for role, fs in run_search(ev, plan):
        if role == "stage":
            if args.output:
                save_json_set(fs, Path(args.output).with_name(f"{fs.name}.json"))
        else:
            _write(fs, args.output if role == "long" else args.short_output)
    print(f"search finished in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


def _write(fs: FactorSet, output: str | None) -> None:
    if output:
        save_json_set(fs, output)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(factor_set_json(fs))


# -- eval / passkey / plot-ppl --------------------------------------------------------------------


def _eval_records(args: argparse.Namespace) -> list[dict[str, Any]]:
    ev = _evaluator(args)
    sets = _sets(args.set)
    if not sets:
        raise FactorSetError("give at least one --set FILE")
    tokens = _tokens(ev, args.text)
    return ev.ppl_table(sets, tokens, args.lengths, args.samples, seed=args.seed)


def cmd_eval(args: argparse.Namespace) -> int:
    records = _eval_records(args)
    if args.json:
        for r in records:
            print(json.dumps(r))
    else:
        _print_table(records)
    return 0


def cmd_passkey(args: argparse.Namespace) -> int:
    ev = _evaluator(args)
    sets = _sets(args.set)
    out = []
    for fs in sets:
        for length in args.lengths:
            try:
                results = ev.passkey(fs, length, depths=args.depths, trials=args.trials, seed=args.seed)
            except ValueError as err:
                raise FactorSetError(f"passkey at {length}: {err}") from None
            acc = sum(r.correct for r in results) / len(results)
            out.append(
                {
                    "set": fs.name,
                    "length": length,
                    "accuracy": acc,
                    "trials": len(results),
                    "key_nll": round(sum(r.key_nll for r in results) / len(results), 4),
                    "by_depth": {str(d): sum(r.correct for r in results if r.depth == d) for d in args.depths},
                }
            )
    for r in out:
        print(
            json.dumps(r)
            if args.json
            else f"{r['set']:<24} {r['length']:>8}  accuracy {r['accuracy']:.2f} ({r['trials']} trials),"
            f" key NLL {r['key_nll']:.3f} nats/token"
        )
    return 0


def cmd_plot_ppl(args: argparse.Namespace) -> int:
    from factors.evaluation.plotting import plot_ppl_records

    if args.records:
        records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
    else:
        if not (args.model and args.set and args.text and args.lengths):
            raise FactorSetError("plot-ppl needs --records FILE, or --model, --set, --text and --lengths to measure")
        records = _eval_records(args)
    if args.save_records:
        Path(args.save_records).write_text("".join(json.dumps(r) + "\n" for r in records))
    return plot_ppl_records(records, args.output, args.window, args.title)


# -- parser ---------------------------------------------------------------------------------------


def add_search_commands(sub: Any) -> None:
    """Register search, eval, passkey and plot-ppl on the longrope-factors subparsers."""
    fmt = DefaultsHelpFormatter

    p = sub.add_parser(
        "search",
        help="LongRoPE evolutionary search for λ_i and n̂ on perplexity or needle-driven perplexity",
        formatter_class=fmt,
        description="Search λ_i (non-decreasing, within [--low, --high]) and n̂ (from --n-hat-choices) that minimise"
        " perplexity at --target-len on --text, starting from PI, NTK and YaRN and their mutations; each generation"
        " keeps the --parents best and adds --mutations mutated and --crossovers crossed children."
        " --objective needle-ppl scores candidates by the loss of task answers only (LongRoPE2), --critical-dim"
        " keeps the pairs past the critical dimension interpolated by at least the extension ratio. With"
        " --progressive the search runs once per length, each stage seeded with the previous one. With --short it"
        " then searches a short set at the model's own window. The output is a factor-set JSON file whose"
        " provenance records the data, lengths, generations and ppl table; it loads into the server unchanged.",
    )
    add_model_options(p)
    p.add_argument("--target-len", type=int, required=True, help="window of the long set (tokens)")
    p.add_argument(
        "--progressive",
        type=int_list(what="lengths"),
        help="chain of lengths, e.g. 256,512,1024: one search per length, each seeded from the one before;"
        " --target-len is the last (and added if missing); none may exceed it",
    )
    p.add_argument(
        "--seed-set",
        action="append",
        default=[],
        metavar="FILE",
        help="a factor set (file or folder) added to the first search's seeds, e.g. the set of a shorter"
        " window: a shorter set is stretched to the target (λ^(ln s_new / ln s_old), n̂ kept); repeatable",
    )
    add_search_budget_options(p)
    p.add_argument("--checkpoint-dir", help="write a resumable checkpoint per stage here after every generation")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --checkpoint-dir")
    p.add_argument("--name", default="longrope", help="name of the long set (stages: NAME-LENGTH)")
    p.add_argument("-o", "--output", help="long set JSON file (default stdout); stages go beside it")
    p.add_argument("--short", action="store_true", help="also search the short set at the model's own window")
    p.add_argument("--short-output", help="short set JSON file (default stdout)")
    add_short_budget_options(p)
    p.add_argument("--table-text", help="after the search, measure set vs baselines on this text (" + TEXT_HELP + ")")
    p.add_argument(
        "--table-baselines",
        type=name_list(BASELINE_METHODS),
        default=["identity", "pi", "ntk", "yarn"],
        help="baselines measured beside the long set in that table",
    )
    p.add_argument("--table-samples", type=int, default=4, help="windows for that table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "eval",
        help="perplexity of sets at lengths on a text",
        formatter_class=fmt,
        description="Perplexity of the model under each set at each length, over --samples windows of the text at"
        " seeded offsets (the same windows for every set). --json prints one"
        ' {"set": NAME, "length": L, "ppl": X} record per line.',
    )
    add_model_options(p)
    _eval_options(p, required=True)
    p.add_argument("--json", action="store_true", help="one JSON record per line instead of a table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "passkey",
        help="passkey retrieval accuracy of sets at lengths",
        formatter_class=fmt,
        description="LongRoPE's synthetic passkey test: a random 5-digit key hidden at each depth of ~L tokens of"
        " repeated filler; a trial is correct when greedy decoding reproduces the key.",
    )
    add_model_options(p)
    p.add_argument("--set", action="append", required=True, metavar="FILE", help="factor file (repeatable)")
    p.add_argument(
        "--lengths", type=int_list(what="lengths"), required=True, help="comma-separated prompt lengths in tokens"
    )
    p.add_argument(
        "--depths",
        type=float_list(low=0.0, high=1.0),
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="comma-separated key depths in [0, 1] (0: start of the prompt, 1: its end)",
    )
    p.add_argument("--trials", type=int, default=2, help="keys per depth")
    p.add_argument("--seed", type=int, default=0, help="seed for the keys")
    p.add_argument("--json", action="store_true", help="one JSON record per set and length")
    p.set_defaults(func=cmd_passkey)

    p = sub.add_parser(
        "plot-ppl",
        help="PNG of perplexity against length for several sets",
        formatter_class=fmt,
        description="Measure (as eval does) or read (--records, eval --json output) perplexity per set and length,"
        " and draw one line per set.",
    )
    add_model_options(
        p, required=False, model_help="Hugging Face Llama-family model folder (not needed with --records)"
    )
    _eval_options(p, required=False)
    p.add_argument("--records", help="plot these eval --json records instead of measuring")
    p.add_argument("--save-records", help="also write the measured records (JSON lines) here")
    p.add_argument("--window", type=int, help="draw the model's trained window as a vertical line")
    p.add_argument("--title", help="plot title")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_plot_ppl)


def add_search_budget_options(p: argparse.ArgumentParser) -> None:
    """The options of one search's text, windows, budget and constraints (search and extend)."""
    p.add_argument(
        "--text",
        action="append",
        metavar="SPEC[,SPEC…]",
        help="text the search measures on, repeatable or comma-separated: several kinds of text (e.g. code and"
        f" prose) so that the set does not fit one kind (default {DEFAULT_TEXT}); each is " + TEXT_HELP,
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="ppl",
        help="what the search minimises: ppl (LongRoPE: perplexity of text windows) or needle-ppl (LongRoPE2:"
        " perplexity of only the answer tokens of task documents at the target length, across depths, built"
        " from every --text)",
    )
    p.add_argument(
        "--critical-dim",
        type=critical_dim,
        default=None,
        metavar="auto|N|off",
        help="LongRoPE2's constraint: λ_i ≥ the extension ratio for every RoPE pair i ≥ the critical one; "
        + CRITICAL_CHOICES_HELP
        + " (default off)",
    )
    p.add_argument(
        "--needle-tasks",
        type=name_list(TASKS),
        default=list(DEFAULT_NEEDLE_TASKS),
        help="task documents of needle-ppl (factors.evaluation.tasks)",
    )
    p.add_argument("--needle-depths", type=int, default=5, help="needle depths of needle-ppl, evenly from 0 to 1")
    p.add_argument("--needle-samples", type=int, default=1, help="needle-ppl documents per text, task and depth")
    p.add_argument(
        "--needle-template", choices=("compact", "english"), default="compact", help="task format of needle-ppl"
    )
    p.add_argument("--samples", type=int, default=4, help="windows of each text per perplexity evaluation")
    p.add_argument("--window-seed", type=int, default=0, help="seed for the windows' offsets in the text")
    p.add_argument("--population", type=int, default=64, help="individuals kept per generation")
    p.add_argument("--parents", type=int, default=32, help="top-k individuals that breed")
    p.add_argument("--mutations", type=int, default=16, help="mutated children per generation")
    p.add_argument("--crossovers", type=int, default=16, help="crossover children per generation")
    p.add_argument("--generations", type=int, default=40, help="generations after the initial population")
    p.add_argument("--seed", type=int, default=0, help="seed of the search's random choices")
    p.add_argument("--low", type=float, default=1.0, help="lower bound of every λ_i")
    p.add_argument("--high", type=float, help="upper bound of every λ_i (default: 2 × the extension ratio, ≥ 2)")
    p.add_argument(
        "--n-hat-choices",
        type=int_list(minimum=0, unique=True),
        default=list(N_HAT_CHOICES),
        help="allowed n̂ values (those below the window are used)",
    )
    p.add_argument(
        "--seed-methods",
        type=name_list(BASELINE_METHODS),
        default=["pi", "ntk", "yarn"],
        help="baselines whose λ seed the initial population (identity, pi, ntk, yarn)",
    )
    p.add_argument("--mscale", type=float, help="attention scale (default: LongRoPE's sqrt(1 + ln s / ln L))")
    p.add_argument("--time-budget", type=float, help="minutes; stop after the generation that passes it")


def add_short_budget_options(p: argparse.ArgumentParser) -> None:
    """The short readjustment's budget, each defaulting to the long search's (search --short and extend)."""
    p.add_argument("--short-samples", type=int, help="windows per evaluation of the short search (default --samples)")
    p.add_argument("--short-population", type=int, help="population of the short search (default --population)")
    p.add_argument("--short-parents", type=int, help="parents of the short search (default --parents)")
    p.add_argument("--short-generations", type=int, help="generations of the short search (default --generations)")


def _eval_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--set", action="append", required=required, metavar="FILE", help="factor file (repeatable)")
    p.add_argument("--text", required=required, help=TEXT_HELP)
    p.add_argument(
        "--lengths", type=int_list(what="lengths"), required=required, help="comma-separated lengths in tokens"
    )
    p.add_argument("--samples", type=int, default=4, help="windows per length")
    p.add_argument("--seed", type=int, default=0, help="seed for the windows' offsets")
