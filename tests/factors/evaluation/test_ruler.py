"""``longrope-factors ruler`` offline on the tiny fixture: one record per set, task, length and depth, every
prediction the model's true greedy continuation under its set, the same output for the same seed, the
heatmap written, and clear exit-2 errors before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factors.cli.main import main
from factors.evaluation.ruler import Prediction, answer_budget, format_table, load_haystack, records
from factors.evaluation.tasks import make_suite
from factors.formats import load_json_set

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "factors" / "data" / "tiny-short" / "model"
YARN = ROOT / "factors" / "data" / "tiny-short" / "sets" / "yarn.json"
SUITE = ["--tasks", "niah_single,vt", "--lengths", "96,160", "--depths", "3", "--samples", "2", "--seed", "5"]
RECORD_KEYS = ["set", "task", "template", "length", "depth", "samples", "correct", "accuracy"]


def _run(tmp: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[list[dict], list[dict]]:
    preds = tmp / "predictions.jsonl"
    argv = ["ruler", "--model", str(MODEL), "--threads", "1", "--set", "plain", "--set", str(YARN), *SUITE]
    assert main([*argv, "--json", "--no-progress", "--predictions", str(preds), *extra]) == 0
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines()], [json.loads(x) for x in preds.read_text().splitlines()]


def test_records_predictions_heatmap_and_determinism(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "plots" / "heatmap.png"
    recs, preds = _run(tmp_path, capsys, "--plot", str(png))
    cells = [(r["set"], r["task"], r["length"], r["depth"]) for r in recs]
    assert cells == [
        (s, t, n, d) for s in ("plain", "yarn") for t in ("niah_single", "vt") for n in (96, 160) for d in (0, 0.5, 1)
    ]
    for r in recs:
        assert list(r) == RECORD_KEYS and r["template"] == "compact" and r["samples"] == 2
        assert r["accuracy"] == r["correct"] / 2
    assert len(preds) == 48
    for p in preds:
        assert p["prompt_tokens"] == p["length"]  # a byte model: one token per byte of a compact prompt
        assert len(p["continuation"].encode()) <= answer_budget(p["answer"])
        assert p["correct"] == p["continuation"].startswith(p["answer"])
    for r in recs:
        mine = [
            p
            for p in preds
            if (p["set"], p["task"], p["length"], p["depth"])
            == tuple(r[k] for k in RECORD_KEYS[:2] + ["length", "depth"])
        ]
        assert [p["sample"] for p in mine] == [0, 1] and sum(p["correct"] for p in mine) == r["correct"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # every continuation is the model's greedy one under its set: an independent forward (eager attention,
    # its own float64 rotary, no KV cache, one prompt at a time) gives the same bytes
    from engine_harness import TorchReference

    prompts = make_suite(["niah_single", "vt"], [96, 160], 3, 2, load_haystack("stdlib:heldout"), 5)
    ref, yarn = TorchReference(str(MODEL)), load_json_set(YARN)
    by_set = {"plain": ([1.0] * len(yarn.factors), 0, 1.0), "yarn": (yarn.factors, yarn.n_hat, yarn.resolved_mscale)}
    for k in (0, 7, 23, 24, 40, 47):  # both sets, both tasks, both lengths
        pred, prompt = preds[k], prompts[k % len(prompts)]
        assert (pred["task"], pred["length"], pred["answer"]) == (prompt.task, prompt.length, prompt.answer)
        want = ref.greedy(list(prompt.prompt.encode()), answer_budget(prompt.answer), *by_set[pred["set"]])
        assert pred["continuation"] == bytes(want).decode("utf-8", errors="replace")

    again_recs, again_preds = _run(tmp_path, capsys)  # the same seed: the same prompts and predictions
    assert (again_recs, again_preds) == (recs, preds)


def test_records_and_table_count_correct_predictions() -> None:
    def pred(s: str, depth: float, sample: int, continuation: str) -> Prediction:
        answer = "12345>"
        return Prediction(
            s, "niah_single", "compact", 64, depth, sample, answer, continuation, continuation.startswith(answer), 64
        )

    preds = [
        pred("a", 0.0, 0, "12345>x"),
        pred("a", 0.0, 1, "12345"),
        pred("a", 1.0, 0, "12345>"),
        pred("b", 0.0, 0, ""),
    ]
    assert records(preds) == [
        {
            "set": "a",
            "task": "niah_single",
            "template": "compact",
            "length": 64,
            "depth": 0.0,
            "samples": 2,
            "correct": 1,
            "accuracy": 0.5,
        },
        {
            "set": "a",
            "task": "niah_single",
            "template": "compact",
            "length": 64,
            "depth": 1.0,
            "samples": 1,
            "correct": 1,
            "accuracy": 1.0,
        },
        {
            "set": "b",
            "task": "niah_single",
            "template": "compact",
            "length": 64,
            "depth": 0.0,
            "samples": 1,
            "correct": 0,
            "accuracy": 0.0,
        },
    ]
    table = format_table(records(preds)).splitlines()
    assert table[1].split() == ["a", "niah_single", "64", "0.50", "1.00", "0.750"]
    assert table[2].split() == ["b", "niah_single", "64", "0.00", "-", "0.000"]


@pytest.mark.parametrize(
    "change,message",
    [
        (["--set", "missing.json"], "cannot read factor file missing.json"),
        (["--set", "plain", "--set", "plain"], "more than one set is named plain"),
        (["--set", "plain", "--lengths", "20"], "length 20 is too short for niah_single (compact): the minimum is"),
        (["--set", "plain", "--haystack", "no/such.txt"], "text file no/such.txt does not exist"),
        (
            ["--set", str(ROOT / "factors" / "data" / "smollm2-135m" / "longrope-16k.json")],
            "does not fit this model: rope_theta",
        ),
    ],
)
def test_errors_exit_2_before_loading_the_model(
    change: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ruler", "--model", str(MODEL), "--lengths", "64", "--no-progress", *change]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize("option", [["--depths", "1.5"], ["--depths", "0"], ["--tasks", "niah"], ["--samples", "0"]])
def test_bad_suite_options_are_usage_errors(option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["ruler", "--model", str(MODEL), "--set", "plain", "--lengths", "64", *option])
    assert exit_info.value.code == 2
    assert f"argument {option[0]}" in capsys.readouterr().err
