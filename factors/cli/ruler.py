"""``longrope-factors ruler``: RULER-style retrieval accuracy of a model under factor sets, offline.

The suite options (tasks, lengths, depths, samples, seed, haystack, template, outputs) are defined here once
and shared with ``longrope-client ruler`` (:mod:`clients.ruler`), which runs the same suite against a server;
nothing here imports torch until a model is loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from factors.cli.args import DefaultsHelpFormatter, add_model_options, int_list, name_list
from factors.evaluation.corpus import KINDS, SPLITS
from factors.evaluation.ruler import PLAIN, Prediction, format_table, load_haystack, records
from factors.evaluation.tasks import TASKS, TEMPLATES, TaskPrompt, make_suite
from factors.schema import FactorSet, FactorSetError

HAYSTACK_HELP = (
    f"text the needles hide in: a UTF-8 file, or KIND:SPLIT with KIND one of {', '.join(KINDS)} and SPLIT one"
    f" of {', '.join(SPLITS)} (see factors.evaluation.corpus; A+B joins two), cleaned of < > = ? and"
    " non-printable bytes"
)
EXAMPLES = """\
examples:
  longrope-factors ruler --model factors/data/tiny-short/model --set plain --set yarn.json \\
      --lengths 128,256,512 --depths 11 --samples 4 --plot heatmap.png
  longrope-factors ruler --model DIR --set long.json --tasks niah_single,vt --lengths 1024 --json > ruler.jsonl"""


class RulerHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults shown, the description's examples kept as written."""


def depth_spec(text: str) -> int | list[float]:
    """argparse ``type`` of --depths: a count (``11`` = 0.0, 0.1, ..., 1.0) or depths in [0, 1] (``0,0.5,1``)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if len(items) == 1 and items[0].isdigit():
        count = int(items[0])
        if count < 1:
            raise argparse.ArgumentTypeError(f"a depth count must be ≥ 1, got {text!r}")
        return count
    try:
        values = [float(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count (e.g. 11) or comma-separated depths in [0, 1] (e.g. 0,0.5,1), got {text!r}"
        ) from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {text!r}")
    return values


def positive(text: str) -> int:
    """argparse ``type``: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}")
    return value


def add_suite_options(p: argparse.ArgumentParser) -> None:
    """The suite and its outputs: the options the offline command and the HTTP client share."""
    g = p.add_argument_group("suite")
    g.add_argument("--tasks", type=name_list(TASKS), default=",".join(TASKS), help="comma-separated tasks")
    g.add_argument(
        "--lengths",
        type=int_list(what="lengths"),
        required=True,
        help="comma-separated prompt lengths (compact: bytes exactly; english: tokens, at most)",
    )
    g.add_argument(
        "--depths",
        type=depth_spec,
        default=11,
        help="needle depths: a count spread over [0, 1] (11 = 0.0, 0.1, ..., 1.0) or a list like 0,0.5,1",
    )
    g.add_argument("--samples", type=positive, default=4, help="prompts per task, length and depth")
    g.add_argument("--seed", type=int, default=0, help="seed of the keys, values and haystack offsets")
    g.add_argument("--haystack", default="stdlib:heldout", help=HAYSTACK_HELP)
    g.add_argument(
        "--template",
        choices=TEMPLATES,
        default="compact",
        help="compact (the byte format of docs/ruler.md) or english (sentences for instruct models)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--json",
        action="store_true",
        help='one record per set, task, length and depth: {"set", "task", "template", "length", "depth",'
        ' "samples", "correct", "accuracy"} (default: a table)',
    )
    o.add_argument("--plot", metavar="PNG", help="write a depth × length accuracy heatmap per set and task")
    o.add_argument("--predictions", metavar="FILE", help="also write every prompt's prediction here (JSON lines)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def suite_from_args(args: argparse.Namespace, measure: Callable[[str], int] | None = None) -> list[TaskPrompt]:
    """The prompts the suite options describe; FactorSetError saying what is wrong."""
    try:
        haystack = load_haystack(args.haystack)
        return make_suite(
            args.tasks, args.lengths, args.depths, args.samples, haystack, args.seed, args.template, measure
        )
    except FactorSetError:
        raise
    except ValueError as err:
        raise FactorSetError(f"ruler: {err}") from None


def check_outputs(args: argparse.Namespace) -> None:
    """Before a long run: --plot can be drawn (a client-only install has no matplotlib)."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise FactorSetError("--plot needs matplotlib: pip install 'longrope-serve[plot]'")


def write_outputs(args: argparse.Namespace, predictions: Sequence[Prediction]) -> int:
    """Records on stdout (JSON lines or a table), the predictions file and the heatmap, as asked."""
    recs = records(predictions)
    if args.predictions:
        Path(args.predictions).parent.mkdir(parents=True, exist_ok=True)
        Path(args.predictions).write_text("".join(json.dumps(p.to_json()) + "\n" for p in predictions))
    if args.json:
        for r in recs:
            print(json.dumps(r))
    else:
        print(format_table(recs))
    if args.plot:
        from factors.evaluation.heatmap import plot_heatmaps

        plot_heatmaps(recs, args.plot)
    return 0


def _set_specs(specs: Sequence[str]) -> list[FactorSet | str]:
    """Each --set: the word ``plain``, or the sets of a file (read before any model is loaded)."""
    from factors.formats import load_any

    out: list[FactorSet | str] = []
    for spec in specs:
        out.extend([PLAIN] if spec == PLAIN else load_any(spec))
    names = [s if isinstance(s, str) else s.name for s in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FactorSetError(f"ruler: more than one set is named {', '.join(twice)}; records are keyed by set name")
    return out


def cmd_ruler(args: argparse.Namespace) -> int:
    from factors.evaluation.ruler import plain_set, prompt_ids, run_offline
    from factors.formats import check_compatible, read_model_rope

    check_outputs(args)
    specs = _set_specs(args.set)
    rope = read_model_rope(args.model)
    for fs in specs:
        if not isinstance(fs, str):
            check_compatible(fs, rope)
    # compact prompts are checked before the model loads; english ones need its tokenizer to be measured
    prompts = suite_from_args(args) if args.template == "compact" else None
    from factors.evaluation.evaluator import Evaluator

    ev = Evaluator(args.model, device=args.device, dtype=args.dtype, threads=args.threads)
    if prompts is None:
        prompts = suite_from_args(args, measure=lambda text: len(prompt_ids(ev, text)))
    sets = [plain_set(ev) if isinstance(s, str) else s for s in specs]
    t0 = time.monotonic()
    predictions = run_offline(ev, sets, prompts, progress=not args.no_progress)
    print(f"ruler: {len(predictions)} predictions in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return write_outputs(args, predictions)


def add_ruler_command(sub: Any) -> None:
    """Register ``ruler`` on the longrope-factors subparsers."""
    p = sub.add_parser(
        "ruler",
        help="RULER-style retrieval accuracy of sets (needles, multi-key, multi-value, variable tracking)",
        formatter_class=RulerHelpFormatter,
        description="Build the task suite (docs/ruler.md) and let the model continue every prompt greedily under\n"
        "each set, applied exactly as the server applies it (float64 angles, n̂, mscale); a prediction is\n"
        "correct when the continuation starts with the answer. Reports accuracy per set, task, length and\n"
        "depth; `longrope-client ruler` runs the same suite against a running server.\n\n" + EXAMPLES,
    )
    add_model_options(p)
    p.add_argument(
        "--set",
        action="append",
        required=True,
        metavar="FILE|plain",
        help="a factor file (its sets), or `plain` for the model's own RoPE; repeatable",
    )
    add_suite_options(p)
    p.set_defaults(func=cmd_ruler)
