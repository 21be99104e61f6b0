"""``longrope-factors search`` end to end on the tiny fixture: progressive chain, short set, ppl tables,
checkpoints and resume, with a budget of a few evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factors.cli.main import main
from factors.formats import check_compatible, load_json_set, read_model_rope

MODEL = Path(__file__).resolve().parents[3] / "factors" / "data" / "tiny-short" / "model"


def test_search_command_progressive_short_table_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    argv = ["search", "--model", str(MODEL), "--threads", "1", "--target-len", "512", "--progressive", "256"]
    argv += ["--samples", "1", "--population", "3", "--parents", "2", "--mutations", "1", "--crossovers", "1"]
    argv += ["--generations", "1", "--short", "--short-population", "2", "--short-parents", "1"]
    argv += ["--short-generations", "0", "--table-text", "stdlib:heldout", "--table-samples", "1"]
    argv += ["--table-baselines", "identity,yarn", "--checkpoint-dir", str(ckpt), "--no-progress"]
    argv += ["-o", str(out / "long.json"), "--short-output", str(out / "short.json")]
    assert main(argv) == 0
    assert "search finished in" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["long.json", "longrope-256.json", "short.json"]
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "longrope-256.ckpt.json",
        "longrope-512.ckpt.json",
        "longrope-short.ckpt.json",
    ]
    stage, long, short = (
        load_json_set(out / f, monotone="reject") for f in ("longrope-256.json", "long.json", "short.json")
    )
    rope = read_model_rope(MODEL)
    for fs in (stage, long, short):
        check_compatible(fs, rope)
        assert fs.provenance.method == "longrope-search"
    assert (stage.name, stage.max_len, long.name, long.max_len) == ("longrope-256", 256, "longrope-512", 512)
    assert "from-256" in long.provenance.metrics["seed_ppl"]
    assert long.provenance.metrics["samples"] == 1 and long.provenance.metrics["data"] == "stdlib:search"
    table = long.provenance.metrics["ppl_table"]
    assert table["text"] == "stdlib:heldout" and table["samples"] == 1
    assert [(r["set"], r["length"]) for r in table["records"]] == [
        ("identity-512", 512),
        ("yarn-512", 512),
        (long.name, 512),
    ]
    assert (short.name, short.max_len, short.resolved_mscale) == ("longrope-short", 128, 1.0)
    assert set(short.provenance.metrics["seed_ppl"]) == {"identity", "long^0.5", "long^0.25"}
    assert [r["length"] for r in short.provenance.metrics["ppl_table"]["records"]] == [128, 128]

    # resumed from the finished checkpoints: the same sets, no search state lost
    again = tmp_path / "again"
    argv = [a if not a.startswith(str(out)) else a.replace(str(out), str(again)) for a in argv]
    assert main([*argv, "--resume"]) == 0
    for f in ("long.json", "longrope-256.json", "short.json"):
        first, second = json.loads((out / f).read_text()), json.loads((again / f).read_text())
        assert (first["factors"], first["n_hat"]) == (second["factors"], second["n_hat"])
        assert first["provenance"]["metrics"]["history"] == second["provenance"]["metrics"]["history"]


def test_search_command_needle_ppl_with_critical_dim_on_two_kinds_of_text(tmp_path: Path) -> None:
    """LongRoPE2's search from the command line: needle-driven perplexity on documents from two text kinds,
    the pairs past the critical one (auto: 11 on this model) interpolated by at least s = 4."""
    out = tmp_path / "needle.json"
    argv = ["search", "--model", str(MODEL), "--threads", "1", "--target-len", "512", "--objective", "needle-ppl"]
    argv += ["--critical-dim", "auto", "--text", "stdlib:search", "--text", "stdlib:heldout"]
    argv += ["--needle-tasks", "niah_single", "--needle-depths", "2", "--population", "3", "--parents", "2"]
    argv += ["--mutations", "1", "--crossovers", "1", "--generations", "1", "--no-progress", "-o", str(out)]
    assert main(argv) == 0
    fs = load_json_set(out, monotone="reject")
    m = fs.provenance.metrics
    assert m["objective"] == "needle-ppl" and m["data"] == "stdlib:search,stdlib:heldout"
    assert m["needle"]["kinds"] == ["stdlib:search", "stdlib:heldout"] and m["needle"]["documents"] == 4
    assert m["critical_pair"] == 11 and m["critical_floor"] == 4.0
    assert min(fs.factors[11:]) >= 4.0 and m["ppl"] <= min(m["seed_ppl"].values())
