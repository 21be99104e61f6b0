"""The report of an ``extend`` run: every model and method at every length, on text no stage trained or
searched on.

A row is a model and a rule that picks, for each length, the set it runs under — the way a server would:

- the source model under plain RoPE, and under PI / NTK / YaRN built for each length (the hand-designed
  baselines, no fine-tuning);
- the source model under the first searched set (no fine-tuning; beyond its window it extrapolates);
- the fine-tuned model under its tiers short / first / next (the smallest window that holds the length,
  as ``longrope-serve`` chooses), and under first / next alone (without the short readjustment);
- each baseline fine-tuned with the same budget, under its own method at the first target and at the next.

Writes ``report.json`` (plan, rows, records), ``report.jsonl`` (``{"set", "length", "ppl"}`` records that
``longrope-factors plot-ppl --records`` draws), ``report.md`` (tables) and ``report.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from factors.baselines import identity_set, make_baseline
from factors.formats import read_model_rope
from factors.schema import FactorSet
from factors.training.extend_plan import ExtendPlan


class ReportSource(Protocol):
    """What the report reads from a run (``factors.training.extend.ExtendRun`` is one): the plan, the
    models and sets the stages left, and the run's cached evaluators and tokens. A protocol, so that the
    report does not import the run that calls it."""

    plan: ExtendPlan
    source: Path
    out: Path
    done: dict[str, Any]

    @property
    def original(self) -> int: ...

    @property
    def model_dir(self) -> Path: ...

    def compare_dir(self, method: str) -> Path: ...

    def load(self, role: str) -> FactorSet: ...

    def evaluator(self, model_dir: Path) -> Any: ...

    def tokens(self, model_dir: Path, text: str) -> Any: ...


@dataclass(frozen=True)
class Row:
    label: str
    model: Path
    tiers: tuple[FactorSet, ...] = ()  # the smallest window ≥ length serves it (the largest beyond them all)
    method: str | None = None  # or: this baseline, built for each length

    def set_for(self, length: int, original: int, geo: Any) -> FactorSet:
        if self.method is not None:
            if length <= original:
                return identity_set(geo, "original", original)
            return make_baseline(self.method, geo, length, name=f"{self.method}-{length}")
        fitting = [fs for fs in self.tiers if fs.max_len >= length]
        return min(fitting, key=lambda fs: fs.max_len) if fitting else max(self.tiers, key=lambda fs: fs.max_len)


def report_rows(run: ReportSource) -> list[Row]:
    plan, geo, original = run.plan, read_model_rope(run.source).geometry, run.original
    first_len, next_len = plan.search.long.target_len, plan.next_target
    rows = [Row("plain RoPE", run.source, (identity_set(geo, "original", next_len),))]
    rows += [Row(f"{m} (no fine-tune)", run.source, method=m) for m in plan.report.baselines]
    rows.append(
        Row(
            "longrope, searched (no fine-tune)",
            run.source,
            (identity_set(geo, "original", original), run.load("first")),
        )
    )
    ft_tiers = (run.load("short"), run.load("first"), run.load("next"))
    rows.append(Row(f"longrope, fine-tuned at {first_len}", run.model_dir, ft_tiers))
    rows.append(Row("longrope, fine-tuned, no short readjustment", run.model_dir, ft_tiers[1:]))
    for method in plan.compare:
        tiers = (
            make_baseline(method, geo, first_len, name=f"{method}-{first_len}"),
            make_baseline(method, geo, next_len, name=f"{method}-{next_len}"),
        )
        rows.append(Row(f"{method}, fine-tuned at {first_len}", run.compare_dir(method), tiers))
    return rows


def default_lengths(original: int, top: int) -> tuple[int, ...]:
    out, n = [], original
    while n < top:
        out.append(n)
        n *= 2
    return (*out, top)


def measure(run: ReportSource) -> dict[str, Any]:
    """ppl and passkey records of every row (one evaluator per model, the same windows for every row)."""
    rp, original = run.plan.report, run.original
    geo = read_model_rope(run.source).geometry
    lengths = rp.lengths or default_lengths(original, run.plan.next_target)
    rows = report_rows(run)
    ppl: list[dict[str, Any]] = []
    passkey: list[dict[str, Any]] = []
    for row in rows:
        ev, tokens = run.evaluator(row.model), run.tokens(row.model, rp.text)
        for length in lengths:
            fs = row.set_for(length, original, geo)
            value = ev.perplexity(fs, ev.windows(tokens, length, rp.samples_at(length), rp.seed))
            ppl.append({"set": row.label, "length": int(length), "ppl": value, "factor_set": fs.name})
        for length in rp.passkey_lengths:
            fs = row.set_for(length, original, geo)
            results = ev.passkey(fs, length, trials=rp.passkey_trials, seed=rp.seed)
            passkey.append(
                {
                    "set": row.label,
                    "length": int(length),
                    "accuracy": sum(r.correct for r in results) / len(results),
                    "trials": len(results),
                    "key_nll": sum(r.key_nll for r in results) / len(results),
                    "factor_set": fs.name,
                }
            )
    samples = {int(n): rp.samples_at(n) for n in lengths}
    return {
        "lengths": list(lengths),
        "samples": samples,
        "rows": [r.label for r in rows],
        "ppl": ppl,
        "passkey": passkey,
    }


def markdown(result: dict[str, Any], text: str) -> str:
    lengths = result["lengths"]
    head = "| model / method | " + " | ".join(str(n) for n in lengths) + " |\n|---|" + "---:|" * len(lengths) + "\n"
    windows = ", ".join(f"{result['samples'][n]} at {n}" for n in lengths)
    lines = [f"Perplexity on `{text}` (windows per length: {windows}):\n\n", head]
    for label in result["rows"]:
        cells = {r["length"]: r["ppl"] for r in result["ppl"] if r["set"] == label}
        lines.append(f"| {label} | " + " | ".join(f"{cells[n]:.3f}" for n in lengths) + " |\n")
    if result["passkey"]:
        pk_lengths = sorted({r["length"] for r in result["passkey"]})
        lines.append("\nPasskey retrieval: accuracy (key NLL, nats per token; ln 10 ≈ 2.30 ignores the needle):\n\n")
        lines.append(
            "| model / method | "
            + " | ".join(str(n) for n in pk_lengths)
            + " |\n|---|"
            + "---:|" * len(pk_lengths)
            + "\n"
        )
        for label in result["rows"]:
            cells = {r["length"]: r for r in result["passkey"] if r["set"] == label}
            lines.append(
                f"| {label} | "
                + " | ".join(f"{cells[n]['accuracy']:.2f} ({cells[n]['key_nll']:.2f})" for n in pk_lengths)
                + " |\n"
            )
    return "".join(lines)


def write_report(run: ReportSource) -> dict[str, Any]:
    from factors.evaluation.plotting import plot_ppl_records

    rp = run.plan.report
    result = measure(run)
    out = run.out
    (out / "report.json").write_text(json.dumps({"done": run.done, **result}, indent=1) + "\n")
    (out / "report.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result["ppl"]))
    (out / "report.md").write_text(markdown(result, rp.text))
    plot_ppl_records(result["ppl"], out / "report.png", window=run.original, title="perplexity against length")
    return result
