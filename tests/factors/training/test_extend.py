"""``longrope-factors extend`` on the tiny fixture with budgets of a few evaluations: every stage writes its
result, a run stopped by the fine-tune's time budget and a run killed inside a later stage both resume to
exactly what the uninterrupted run wrote, and a folder of another plan is never mixed into."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from factors.cli.main import main
from factors.formats import load_json_set, model_set_files

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "factors" / "data" / "tiny-short" / "model"

ARGS = ["--model", str(MODEL), "--threads", "1", "--target-len", "256", "--next-target", "512"]
ARGS += ["--samples", "1", "--population", "3", "--parents", "2", "--mutations", "1", "--crossovers", "1"]
ARGS += ["--generations", "1", "--short-generations", "1", "--short-population", "2", "--short-parents", "1"]
ARGS += ["--ft-steps", "16", "--ft-grad-accum", "1", "--ft-lr", "1e-3", "--ft-warmup", "2"]
ARGS += ["--ft-checkpoint-every", "1", "--compare", "yarn", "--report-lengths", "128,256,512"]
ARGS += ["--report-samples", "1", "--report-tokens", "512", "--next-generations", "2", "--no-progress"]


def _extend(out: Path, *extra: str) -> int:
    return main(["extend", *ARGS, "--out", str(out), *extra])


def _outputs(out: Path) -> dict[str, object]:
    """What a run produced: its sets' numbers, both models' weights, the report's perplexities."""
    sets = {
        p.name: (lambda fs: (fs.factors, fs.n_hat, fs.mscale))(load_json_set(p)) for p in (out / "sets").glob("*.json")
    }
    weights = {
        folder: {k: v.tolist() for k, v in load_file(out / folder / "model.safetensors").items()}
        for folder in ("model", "compare-yarn/model")
    }
    report = [(r["set"], r["length"], r["ppl"]) for r in json.loads((out / "report.json").read_text())["ppl"]]
    return {"sets": sets, "weights": weights, "report": report}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    assert _extend(out) == 0
    return out


def test_every_stage_writes_its_result(uninterrupted: Path) -> None:
    out = uninterrupted
    state = json.loads((out / "extend.json").read_text())
    assert list(state["done"]) == ["search", "finetune", "next", "short", "compare", "report"]
    assert sorted(p.name for p in (out / "sets").iterdir()) == [
        "longrope-256.json",
        "longrope-512.json",
        "longrope-short.json",
    ]
    served = sorted(load_json_set(p).name for p in model_set_files(out / "model"))
    assert served == ["longrope-256", "longrope-512", "longrope-short"]  # the tiers longrope-serve starts with
    assert sorted(load_json_set(p).name for p in model_set_files(out / "compare-yarn" / "model")) == [
        "yarn-256",
        "yarn-512",
    ]
    first, nxt, short = (load_json_set(out / "sets" / f"longrope-{t}.json") for t in ("256", "512", "short"))
    assert "from-256" in nxt.provenance.metrics["seed_ppl"]  # the next search is seeded with the first set, stretched
    assert "turned-256" in nxt.provenance.metrics["seed_ppl"]  # and extended only where it never turned a circle
    # the short readjustment of a model fine-tuned under the first set: its λ is a seed, its mscale is kept
    assert set(short.provenance.metrics["seed_ppl"]) == {"identity", "long", "long^0.5", "long^0.25"}
    assert short.max_len == 128 and short.resolved_mscale == first.resolved_mscale > 1
    assert json.loads((out / "model" / "finetune.json").read_text())["steps"] == 16
    report = json.loads((out / "report.json").read_text())
    assert report["lengths"] == [128, 256, 512] and len(report["ppl"]) == 3 * len(report["rows"])
    assert report["samples"] == {"128": 4, "256": 2, "512": 1}  # --report-tokens 512, at least --report-samples
    assert nxt.provenance.metrics["generations_run"] == 2  # --next-generations overrides the first search's 1
    assert {r["factor_set"] for r in report["ppl"] if r["set"] == "longrope, fine-tuned at 256"} == {
        "longrope-short",
        "longrope-256",
        "longrope-512",
    }
    md = (out / "report.md").read_text()
    assert "| yarn, fine-tuned at 256 |" in md and (out / "report.png").stat().st_size > 10_000


def test_stopped_and_killed_runs_resume_to_the_uninterrupted_result(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 1. the fine-tune's time budget stops the run after one step (exit 3, checkpoint kept)
    assert _extend(out, "--ft-time-budget", "0") == 3
    assert list(json.loads((out / "extend.json").read_text())["done"]) == ["search"]
    # 2. resumed in another process and killed (SIGKILL) inside the baseline's fine-tune
    cmd = [sys.executable, "-m", "factors.cli.main", "extend", *ARGS, "--out", str(out), "--resume"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ckpt = out / "checkpoints" / "finetune-yarn" / "finetune.ckpt.pt"
    deadline = time.monotonic() + 600
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list(json.loads((out / "extend.json").read_text())["done"])
    assert done == ["search", "finetune", "next", "short"], (done, proc.stderr.read().decode()[-2000:])
    # 3. resumed again: it finishes, and everything equals the uninterrupted run
    assert _extend(out, "--resume") == 0
    assert _outputs(out) == _outputs(uninterrupted)


def test_a_folder_is_never_mixed_with_another_run(
    uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _extend(uninterrupted) == 2
    assert "add --resume" in capsys.readouterr().err
    other = ["extend", *ARGS, "--out", str(uninterrupted), "--resume", "--ft-lr", "5e-4"]
    assert main(other) == 2
    assert "another model or plan" in capsys.readouterr().err
    (tmp_path / "junk.txt").write_text("x")
    assert _extend(tmp_path) == 2
    assert "not empty" in capsys.readouterr().err
    # a finished run resumed does nothing more and says what it did
    assert _extend(uninterrupted, "--resume") == 0


@pytest.mark.parametrize("next_objective", [None, "ppl"])
def test_extend_the_longrope2_way(tmp_path: Path, next_objective: str | None) -> None:
    """extend with needle-driven search, the critical-dimension constraint and mixed-window fine-tuning: each
    reaches its stage (the sets' provenance, finetune.json), and the short tier of a model that kept the
    original RoPE in its window is that RoPE (λ = 1, n̂ = 0, mscale 1), as LongRoPE2 keeps it; the next
    search runs under --next-objective when given, and the plan records it."""
    out = tmp_path / "run"
    argv = ["extend", "--model", str(MODEL), "--threads", "1", "--target-len", "256", "--next-target", "512"]
    argv += ["--objective", "needle-ppl", "--critical-dim", "auto", "--text", "stdlib:search,stdlib:heldout"]
    argv += ["--needle-tasks", "niah_single", "--needle-depths", "2", "--samples", "1", "--population", "2"]
    argv += ["--parents", "1", "--mutations", "1", "--crossovers", "0", "--generations", "0"]
    argv += ["--short-population", "2", "--short-parents", "1", "--ft-steps", "1", "--ft-grad-accum", "4"]
    argv += ["--ft-mixed-window", "0.5", "--ft-task-ratio", "0.5", "--ft-text", "stdlib:search"]
    argv += ["--skip", "compare,report", "--no-progress", "--out", str(out)]
    argv += ["--next-objective", next_objective] if next_objective else []
    assert main(argv) == 0
    first, nxt, short = (load_json_set(out / "sets" / f"longrope-{t}.json") for t in ("256", "512", "short"))
    for fs, s, objective in ((first, 2.0, "needle-ppl"), (nxt, 4.0, next_objective or "needle-ppl")):
        assert fs.provenance.metrics["objective"] == objective and fs.provenance.metrics["critical_pair"] == 11
        assert min(fs.factors[11:]) >= s
    assert short.factors == [1.0] * len(first.factors) and short.n_hat == 0 and short.resolved_mscale == 1.0
    assert short.max_len == 128 and "mixed context window" in short.provenance.notes
    assert (out / "model" / "longrope-sets" / "longrope-short.json").exists()
    record = json.loads((out / "model" / "finetune.json").read_text())
    assert record["mixed"]["short_len"] == 128 and record["mixed"]["short_sequences"] > 0
    plan = json.loads((out / "extend.json").read_text())["plan"]
    assert plan["search"]["objective"]["objective"] == "needle-ppl"
    assert plan.get("next_objective") == next_objective  # absent by default: older runs keep their identity
