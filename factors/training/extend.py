"""LongRoPE's whole road in one resumable run (``longrope-factors extend``).

1. ``search``   — search the first target on the source model, without fine-tuning (a progressive chain if
                  the plan has stages);
2. ``finetune`` — fine-tune the source model at that length under the searched set;
3. ``next``     — search the next target on the fine-tuned model, seeded with the first set stretched and
                  with it extended only where it never turned a full circle (``critical.turned_seed``);
4. ``short``    — readjust the short set for the fine-tuned model at the model's own window (after mixed
                  context window training: the model's own RoPE, which that training kept in the window);
5. ``compare``  — optionally fine-tune the source model with the same budget under a baseline (e.g. YaRN
                  at the first target), the comparison the method is measured against;
6. ``report``   — perplexity (and passkey) of every model and method at every report length.

Each stage writes its result to the output folder and records itself in ``extend.json``; the searches and
fine-tunes checkpoint inside their stage. Running the same command again with ``--resume`` skips the
finished stages and continues the interrupted one where it stopped. The output folder::

    extend.json              the plan and the stages done (with their seconds)
    sets/                    NAME-T1 (searched, no fine-tune), NAME-T2 and NAME-short (fine-tuned model)
    model/                   the fine-tuned model; its longrope-sets/ holds short, T1 and T2: longrope-serve
                             serves the folder as it is
    compare-METHOD/model/    a baseline fine-tuned with the same budget (its sets in its longrope-sets/)
    checkpoints/             search and fine-tune checkpoints
    report.json, report.md   the measurements (see factors.training.report)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from factors.baselines import make_baseline
from factors.formats import MODEL_SETS_DIR, load_any, read_model_rope, save_json_set
from factors.schema import FactorSet, FactorSetError
from factors.training.extend_plan import ExtendPlan
from factors.training.finetune import Finetuner
from factors.training.report import write_report

logger = logging.getLogger("longrope.extend")

STATE_FILE = "extend.json"
STAGES = ("search", "finetune", "next", "short", "compare", "report")


def guarded(record: dict[str, Any]) -> dict[str, Any]:
    """What a fine-tune's window guard chose, for extend.json (nothing without the guard)."""
    g = record.get("window_guard")
    return {"window_alpha": g["alpha"], "window_accuracy": g["accuracy"]} if g else {}


class StageInterrupted(Exception):
    """A stage stopped before its end (a fine-tune's time budget); ``--resume`` continues it."""


EvaluatorFactory = Callable[[str | Path], Any]


class ExtendRun:
    """One output folder and the stages done in it."""

    def __init__(self, source: str | Path, out: str | Path, plan: ExtendPlan, make_evaluator: EvaluatorFactory) -> None:
        self.source, self.out, self.plan, self.make_evaluator = Path(source), Path(out), plan, make_evaluator
        self.state_path = self.out / STATE_FILE
        self.done: dict[str, Any] = {}
        self._identity: dict[str, Any] = {}
        self._evaluators: dict[Path, Any] = {}
        self._tokens: dict[tuple[Path, str], Any] = {}
        self.original = read_model_rope(self.source).geometry.original_max_len

    # -- state -------------------------------------------------------------------------------------

    def open(self, resume: bool) -> None:
        """Start a new folder, or (``resume``) continue the run recorded in it; never mix two plans."""
        identity = {"source": str(self.source.resolve()), **self.plan.identity()}
        if self.state_path.exists():
            if not resume:
                raise FactorSetError(f"{self.out} holds an extend run already; add --resume to continue it")
            state = json.loads(self.state_path.read_text())
            if state.get("plan") != identity:
                raise FactorSetError(
                    f"{self.out} holds an extend run with another model or plan; continue it with its own options"
                    " or use another --out"
                )
            self.done = state.get("done", {})
            self._identity = identity
            return
        if self.out.exists() and any(self.out.iterdir()):
            raise FactorSetError(f"{self.out} is not empty and holds no extend run; give a new or empty --out")
        self.out.mkdir(parents=True, exist_ok=True)
        self._identity = identity
        self._write()

    def _write(self) -> None:
        identity = getattr(self, "_identity", None)
        if identity is None:
            identity = json.loads(self.state_path.read_text())["plan"]
            self._identity = identity
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"plan": identity, "done": self.done}, indent=1) + "\n")
        os.replace(tmp, self.state_path)

    def _finish(self, stage: str, t0: float, **info: Any) -> None:
        self.done[stage] = {"seconds": round(time.monotonic() - t0, 1), **info}
        self._write()
        logger.info("stage %s done in %.0f s", stage, self.done[stage]["seconds"])

    # -- paths -------------------------------------------------------------------------------------

    def set_path(self, role: str) -> Path:
        tag = {"first": str(self.plan.search.long.target_len), "next": str(self.plan.next_target)}.get(role, role)
        return self.out / "sets" / f"{self.plan.name}-{tag}.json"

    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    def compare_dir(self, method: str) -> Path:
        return self.out / f"compare-{method}" / "model"

    def load(self, role: str) -> FactorSet:
        return load_any(self.set_path(role))[0]

    def _save_set(self, fs: FactorSet, role: str, into_model: bool = True) -> None:
        save_json_set(fs, self.set_path(role))
        if into_model:
            save_json_set(fs, self.model_dir / MODEL_SETS_DIR / f"{fs.name}.json")

    # -- stages ------------------------------------------------------------------------------------

    def run(self, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
        from factors.search.critical import turned_seed
        from factors.search.evolution import scaled_seed
        from factors.search.progressive import progressive, search_set, short_readjust

        plan = self.plan
        sp = replace(plan.search, checkpoint_dir=self.out / "checkpoints", resume=True)
        first_len = sp.long.target_len
        if "search" in stages and "search" not in self.done:
            t0 = time.monotonic()
            ev = self.evaluator(self.source)
            first = progressive(ev, self.search_tokens(self.source, sp.text), sp)[-1]  # one search, or the chain
            self._save_set(first, "first", into_model=False)
            self._finish("search", t0, set=first.name, ppl=first.provenance.metrics.get("ppl"))
        if "finetune" in stages and "finetune" not in self.done:
            t0 = time.monotonic()
            record = self._finetune(self.load("first"), self.model_dir, self.out / "checkpoints" / "finetune")
            self._finish(
                "finetune", t0, first_loss=record["first_loss"], last_loss=record["last_loss"], **guarded(record)
            )
        if "next" in stages and "next" not in self.done:
            t0 = time.monotonic()
            name = f"{plan.name}-{plan.next_target}"
            first = self.load("first")
            nxt, _ = search_set(
                self.evaluator(self.model_dir),
                self.search_tokens(self.model_dir, sp.text),
                sp,
                plan.next_config,
                name=name,
                checkpoint=sp.checkpoint(name),
                samples=plan.next_samples or sp.samples,
                objective=plan.next_objective,
                extra_seeds=[scaled_seed(first, plan.next_target), turned_seed(first, plan.next_target)],
            )
            self._save_set(nxt, "next")
            self._finish("next", t0, set=nxt.name, ppl=nxt.provenance.metrics.get("ppl"))
        if "short" in stages and "short" not in self.done:
            t0 = time.monotonic()
            if plan.finetune.mixed_short > 0:
                short = self._original_short()
            else:
                short = short_readjust(
                    self.evaluator(self.model_dir),
                    self.search_tokens(self.model_dir, sp.text),
                    self.load("first"),
                    sp,
                    trained_under_long=True,
                )
            self._save_set(short, "short")
            self._finish("short", t0, set=short.name, ppl=short.provenance.metrics.get("ppl"))
        if "compare" in stages and "compare" not in self.done:
            t0 = time.monotonic()
            info = {}
            geo = read_model_rope(self.source).geometry
            for method in plan.compare:
                trained = make_baseline(method, geo, first_len, name=f"{method}-{first_len}")
                folder = self.compare_dir(method)
                record = self._finetune(trained, folder, self.out / "checkpoints" / f"finetune-{method}")
                longer = make_baseline(method, geo, plan.next_target, name=f"{method}-{plan.next_target}")
                save_json_set(longer, folder / MODEL_SETS_DIR / f"{longer.name}.json")
                info[method] = {"last_loss": record["last_loss"], "seconds": record["seconds"], **guarded(record)}
            self._finish("compare", t0, **info)
        if "report" in stages and "report" not in self.done:
            t0 = time.monotonic()
            write_report(self)
            self._finish("report", t0)
        return self.done

    def _original_short(self) -> FactorSet:
        """The short tier after mixed context window training: the model's own RoPE (λ = 1, mscale 1), as
        LongRoPE2 keeps it. The fine-tune trained the window under exactly these angles, so there is nothing
        to readjust; on the retrieval fixture a readjusted set searched on the search windows lost in-window
        retrieval (vt 0.95 → 0.82, multivalue 0.84 → 0.73, docs/effective-context.md)."""
        geo = read_model_rope(self.source).geometry
        fs = make_baseline("identity", geo, geo.original_max_len, name=f"{self.plan.name}-short")
        note = "mixed context window training kept the original RoPE in the window: no readjustment"
        return fs.model_copy(update={"provenance": fs.provenance.model_copy(update={"notes": note})})

    # -- models ------------------------------------------------------------------------------------

    def evaluator(self, model_dir: Path) -> Any:
        """The evaluator of a model that is only measured (searches, report): loaded once per run. A
        fine-tune gets a fresh one of its own (:meth:`_finetune`), whose weights it changes."""
        if model_dir not in self._evaluators:
            self._evaluators[model_dir] = self.make_evaluator(model_dir)
        return self._evaluators[model_dir]

    def tokens(self, model_dir: Path, text: str) -> Any:
        """A text's token ids under a model's tokenizer, tokenised once per run."""
        from factors.search.progressive import text_tokens

        key = (model_dir, text)
        if key not in self._tokens:
            self._tokens[key] = text_tokens(self.evaluator(model_dir), text)
        return self._tokens[key]

    def search_tokens(self, model_dir: Path, text: str) -> list[Any]:
        """The token ids of each text of a search's comma-separated list (each kind gives its own windows)."""
        from factors.search.objective import text_specs

        return [self.tokens(model_dir, spec) for spec in text_specs(text)]

    def _finetune(self, fs: FactorSet, folder: Path, checkpoint_dir: Path) -> dict[str, Any]:
        from factors.search.progressive import text_tokens

        ev = self.make_evaluator(self.source)
        ft = Finetuner(
            ev,
            fs,
            self.plan.finetune,
            text_tokens(ev, self.plan.finetune.text),
            checkpoint_dir=checkpoint_dir,
            progress=self.plan.search.progress,
        )
        state = ft.run(resume=True)
        if state.stopped_by == "time_budget":
            raise StageInterrupted(
                f"the fine-tune under {fs.name} stopped at step {state.step} of {self.plan.finetune.steps} (time"
                f" budget); run the same command with --resume to continue from {checkpoint_dir}"
            )
        ft.save(folder)
        return ft.record()
