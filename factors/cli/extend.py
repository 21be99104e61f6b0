"""``longrope-factors finetune | extend``: LongRoPE's fine-tuning step, and the whole road in one command.

These commands load a Hugging Face model (transformers, CPU or CUDA); they never import vLLM.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from factors.baselines import BASELINE_METHODS
from factors.cli.args import DefaultsHelpFormatter, add_model_options, int_list, name_list
from factors.cli.search import add_search_budget_options, add_short_budget_options, search_plan
from factors.evaluation.tasks import TASKS
from factors.formats import load_any
from factors.schema import FactorSetError
from factors.search.objective import OBJECTIVES


def _evaluator_factory(args: argparse.Namespace) -> Any:
    import torch

    from factors.evaluation.evaluator import Evaluator

    if args.device == "cpu":
        torch.use_deterministic_algorithms(True)  # a resumed fine-tune equals the uninterrupted one

    def make(model_dir: str | Path) -> Any:
        torch.manual_seed(0)
        return Evaluator(model_dir, device=args.device, dtype=args.dtype, threads=args.threads)

    return make


def add_finetune_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The fine-tune's budget (``prefix`` "ft-" in extend, where the search has options of the same names)."""
    g = p.add_argument_group("fine-tune")
    g.add_argument(f"--{prefix}steps", type=int, default=200, help="optimiser steps")
    g.add_argument(f"--{prefix}micro-batch", type=int, default=1, help="windows per forward/backward pass")
    g.add_argument(
        f"--{prefix}grad-accum", type=int, default=8, help="micro-batches accumulated into each optimiser step"
    )
    g.add_argument(f"--{prefix}lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    g.add_argument(f"--{prefix}warmup", type=int, default=10, help="linear warm-up steps, then cosine decay")
    g.add_argument(
        f"--{prefix}min-lr-ratio", type=float, default=0.1, help=f"the cosine decays to this fraction of --{prefix}lr"
    )
    g.add_argument(f"--{prefix}weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument(f"--{prefix}max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument(f"--{prefix}seed", type=int, default=0, help="seed of the training windows")
    g.add_argument(
        f"--{prefix}text",
        default="stdlib:train",
        help="training text: a UTF-8 file, or stdlib:train / stdlib:search / stdlib:heldout (the Python standard"
        " library's source split by file; see factors.evaluation.corpus)",
    )
    g.add_argument(f"--{prefix}checkpoint-every", type=int, default=25, help="write a checkpoint every N steps")
    g.add_argument(
        f"--{prefix}gradient-checkpointing",
        action="store_true",
        help="recompute activations during backward (less memory for long windows of real models, slower)",
    )
    g.add_argument(
        f"--{prefix}mixed-window",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="mixed context window training (LongRoPE2): this fraction of the micro-batches are short sequences"
        f" (--{prefix}short-len) trained under the model's original RoPE, the rest long ones under the set;"
        " 0 trains every sequence long",
    )
    g.add_argument(
        f"--{prefix}short-len", type=int, help="length of the short sequences (default: the model's own window)"
    )
    g.add_argument(
        f"--{prefix}task-ratio",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="this fraction of the sequences are task documents (compact format: needle, multi-key, multi-value,"
        " variable tracking) at a random depth, short or long as their micro-batch",
    )
    g.add_argument(f"--{prefix}tasks", type=name_list(TASKS), default=list(TASKS), help="the tasks of those documents")
    g.add_argument(f"--{prefix}task-text", help=f"haystack text of the task documents (default --{prefix}text)")
    g.add_argument(
        f"--{prefix}keep-window",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="after training, blend the weights back toward the source model (θ = α·tuned + (1 − α)·source, α"
        " from 1 down by 0.05) until the in-window task accuracy under the original RoPE is ≥ RATIO × the"
        " source's, e.g. 0.98; measured on a validation text, never the report's; needs"
        f" --{prefix}mixed-window > 0; 0 keeps the trained weights",
    )
    g.add_argument(
        f"--{prefix}keep-window-text",
        help="haystack text of that measurement (default: "
        + ("the search's --text" if prefix else "stdlib:search")
        + ")",
    )
    g.add_argument(
        f"--{prefix}keep-window-samples",
        type=int,
        default=24,
        help=f"prompts per task and depth of that measurement (11 depths, the tasks of --{prefix}tasks)",
    )
    g.add_argument(
        f"--{prefix}time-budget",
        type=float,
        help="minutes; after the step that passes it, write a checkpoint and stop (continue with --resume)",
    )


def finetune_config(
    args: argparse.Namespace, target_len: int, prefix: str = "", guard_text: str = "stdlib:search"
) -> Any:
    """The fine-tune's settings from the options; ``guard_text`` is the window guard's text by default."""
    from factors.training.plan import FinetuneConfig

    def get(name: str) -> Any:
        return getattr(args, (prefix + name).replace("-", "_"))

    budget = get("time-budget")
    config = FinetuneConfig(
        target_len=target_len,
        steps=get("steps"),
        micro_batch=get("micro-batch"),
        grad_accum=get("grad-accum"),
        lr=get("lr"),
        warmup_steps=get("warmup"),
        min_lr_ratio=get("min-lr-ratio"),
        weight_decay=get("weight-decay"),
        max_grad_norm=get("max-grad-norm"),
        seed=get("seed"),
        text=get("text"),
        checkpoint_every=get("checkpoint-every"),
        time_budget_s=budget * 60 if budget is not None else None,
        gradient_checkpointing=get("gradient-checkpointing"),
        mixed_short=get("mixed-window"),
        short_len=get("short-len"),
        task_ratio=get("task-ratio"),
        tasks=tuple(get("tasks")),
        task_text=get("task-text"),
        keep_window=get("keep-window"),
        keep_window_text=get("keep-window-text") or guard_text,
        keep_window_samples=get("keep-window-samples"),
    )
    try:
        config.validate()
    except ValueError as err:
        raise FactorSetError(f"fine-tune: {err}") from None
    return config


def cmd_finetune(args: argparse.Namespace) -> int:
    from factors.search.progressive import text_tokens
    from factors.training.finetune import Finetuner

    sets = load_any(args.set)
    if len(sets) != 1:
        raise FactorSetError(f"{args.set} holds {len(sets)} sets; give a file of one set to fine-tune under")
    fs = sets[0]
    config = finetune_config(args, args.target_len or fs.max_len)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FactorSetError(f"{out} is not empty; give a new folder (or --resume to finish a run that writes it)")
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + ".ckpt")
    ev = _evaluator_factory(args)(args.model)
    ft = Finetuner(
        ev, fs, config, text_tokens(ev, config.text), checkpoint_dir=checkpoint_dir, progress=not args.no_progress
    )
    state = ft.run(resume=args.resume)
    if state.stopped_by == "time_budget":
        print(
            f"stopped by the time budget at step {state.step}/{config.steps} after {state.elapsed_s:.0f} s;"
            f" checkpoint in {checkpoint_dir}: run the same command with --resume to continue",
            file=sys.stderr,
        )
        return 3
    ft.save(out)
    if (g := ft.guard_record) is not None:
        print(
            f"window guard: kept α {g['alpha']:g} of the fine-tune, in-window accuracy {g['accuracy']:.4f} (source"
            f" {g['source_accuracy']:.4f}, target {g['target']:.4f}"
            + ("" if g["met"] else ": not met, the most accurate α tried")
            + ")",
            file=sys.stderr,
        )
    print(
        f"fine-tuned {state.step} steps in {state.elapsed_s:.0f} s (loss {state.losses[0]:.4f} → {state.losses[-1]:.4f});"
        f" wrote {out} (serve it with: longrope-serve --model {out})",
        file=sys.stderr,
    )
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    from factors.search.objective import text_specs
    from factors.training.extend import STAGES, ExtendRun, StageInterrupted
    from factors.training.extend_plan import ExtendPlan, ReportPlan

    sp = search_plan(args)
    try:
        plan = ExtendPlan(
            search=sp,
            finetune=finetune_config(args, args.target_len, prefix="ft_", guard_text="+".join(text_specs(sp.text))),
            next_target=args.next_target,
            next_samples=args.next_samples,
            next_budget={
                k: getattr(args, f"next_{k}")
                for k in ("population", "parents", "mutations", "crossovers", "generations")
                if getattr(args, f"next_{k}") is not None
            },
            next_objective=args.next_objective,
            compare=tuple(args.compare),
            report=ReportPlan(
                text=args.report_text,
                lengths=tuple(args.report_lengths or ()),
                samples=args.report_samples,
                tokens=args.report_tokens,
                seed=args.report_seed,
                passkey_lengths=tuple(args.passkey_lengths or ()),
                passkey_trials=args.passkey_trials,
            ),
        )
    except ValueError as err:
        raise FactorSetError(f"extend: {err}") from None
    run = ExtendRun(args.model, args.out, plan, _evaluator_factory(args))
    run.open(resume=args.resume)
    t0 = time.monotonic()
    try:
        done = run.run(tuple(s for s in STAGES if s not in args.skip))
    except StageInterrupted as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 3
    for stage, info in done.items():
        print(
            f"{stage:<9} {info['seconds']:>8.0f} s  " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "seconds")
        )
    print(
        f"extend finished in {time.monotonic() - t0:.0f} s; model in {run.model_dir}, report in {run.out / 'report.md'}",
        file=sys.stderr,
    )
    return 0


def add_extend_commands(sub: Any) -> None:
    fmt = DefaultsHelpFormatter
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model at a length under a factor set",
        formatter_class=fmt,
        description="Train a Hugging Face causal LM on windows of --target-len tokens under one factor set (λ, n̂ and"
        " mscale applied exactly as the evaluator and the server apply them), with AdamW, warm-up and cosine decay,"
        " gradient accumulation and clipping. Deterministic for a seed (CPU); a checkpoint is written every"
        " --checkpoint-every steps and when --time-budget stops the run, and --resume continues exactly where it"
        " stopped. The output folder is a model longrope-serve serves as it is: weights, config, tokenizer,"
        " the set under longrope-sets/ and finetune.json (data, steps, lengths, losses, seconds).",
    )
    add_model_options(p)
    p.add_argument("--set", required=True, metavar="FILE", help="the factor set to train under (one set)")
    p.add_argument("--target-len", type=int, help="training window in tokens (default: the set's window)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="model folder to write")
    p.add_argument("--checkpoint-dir", help="where checkpoints go (default: OUTPUT.ckpt beside the output)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_finetune_options(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "extend",
        help="LongRoPE's whole road: search, fine-tune, search further, readjust short, report",
        formatter_class=fmt,
        description="Search --target-len on the model without fine-tuning, fine-tune at that length under the"
        " searched set, search --next-target on the fine-tuned model (seeded with the first set stretched), and"
        " readjust the short set at the model's own window; optionally fine-tune baselines (--compare yarn) with"
        " the same budget, then report perplexity (and passkey) of every model and method at every length on"
        " held-out text. Each stage is recorded in OUT/extend.json as it finishes and checkpoints inside;"
        " the same command with --resume continues an interrupted run. OUT/model is served by"
        " `longrope-serve --model OUT/model` with its short, first and next sets.",
    )
    add_model_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty, or --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run recorded in --out")
    p.add_argument("--target-len", type=int, required=True, help="first target: searched, then fine-tuned at")
    p.add_argument("--next-target", type=int, required=True, help="window searched on the fine-tuned model")
    p.add_argument(
        "--progressive",
        type=int_list(what="lengths"),
        help="chain of lengths up to --target-len for the first search (as search --progressive)",
    )
    p.add_argument("--name", default="longrope", help="set names: NAME-<target>, NAME-<next>, NAME-short")
    add_search_budget_options(p)
    p.add_argument("--next-samples", type=int, help="windows per evaluation of the next search (default --samples)")
    for what in ("population", "parents", "mutations", "crossovers", "generations"):
        p.add_argument(f"--next-{what}", type=int, help=f"{what} of the next search (default --{what})")
    p.add_argument(
        "--next-objective",
        choices=OBJECTIVES,
        help="objective of the next search (default --objective). Past the fine-tuned length a small model may"
        " retrieve nothing at all, and needle-ppl then ranks failures: ppl fits the text there",
    )
    add_short_budget_options(p)
    add_finetune_options(p, prefix="ft-")
    g = p.add_argument_group("comparison and report")
    g.add_argument(
        "--compare",
        type=name_list(BASELINE_METHODS),
        default=[],
        help="baselines also fine-tuned at --target-len with the same budget, e.g. yarn",
    )
    g.add_argument(
        "--report-text",
        default="stdlib:heldout",
        help="text the report measures on, which no stage should have seen (a file or stdlib:SPLIT)",
    )
    g.add_argument(
        "--report-lengths", type=int_list(what="lengths"), help="default: original window × 2^k to --next-target"
    )
    g.add_argument("--report-samples", type=int, default=4, help="windows per length in the report")
    g.add_argument(
        "--report-tokens",
        type=int,
        default=0,
        help="at least this many tokens per length in the report: more windows where they are short",
    )
    g.add_argument("--report-seed", type=int, default=1, help="seed of the report's windows and passkeys")
    g.add_argument("--passkey-lengths", type=int_list(what="lengths"), help="passkey retrieval at these lengths")
    g.add_argument("--passkey-trials", type=int, default=2, help="keys per depth (5 depths)")
    g.add_argument(
        "--skip",
        type=name_list(("compare", "report")),
        default=[],
        help="stages to leave out this time (compare, report); a later --resume can run them",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(
        func=cmd_extend,
        short=True,
        seed_set=[],
        checkpoint_dir=None,
        table_text=None,
        table_samples=4,
        table_baselines=[],
    )
