"""The longrope-factors CLI, run as users run it."""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from factors.cli.main import build_parser, main

MODEL_CFG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(MODEL_CFG))
    return d


def test_baseline_show_validate_angles(tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "yarn.json"
    assert main(["baseline", "yarn", "--model", str(model_dir), "--target-len", "32768", "-o", str(out)]) == 0
    fs = json.loads(out.read_text())
    assert fs["rotary_dim"] == 16 and fs["max_len"] == 32768 and fs["provenance"]["method"] == "yarn"
    assert main(["validate", str(out), "--model", str(model_dir)]) == 0
    assert "ok " in capsys.readouterr().out
    assert main(["show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown[0]["name"] == "yarn-32768" and shown[0]["rope_state_bytes"] == (16 + 2) * 8
    assert main(["angles", str(out), "--positions", "0,1,4095,2097151", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["positions"] == [0, 1, 4095, 2097151]
    assert len(rec["cos"]) == 4 and len(rec["cos"][0]) == 8 and len(rec["sin"][3]) == 8
    assert math.isclose(rec["cos"][0][0], fs["mscale"], rel_tol=1e-7) and rec["sin"][0][0] == 0.0


def test_validate_reports_bad_files(tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "name": "x",
                "factors": [1.0] * 3,
                "rope_theta": 10000.0,
                "rotary_dim": 16,
                "original_max_len": 4096,
                "max_len": 8192,
            }
        )
    )
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps(
            {
                "name": "y",
                "factors": [1.0] * 8,
                "rope_theta": 500000.0,
                "rotary_dim": 16,
                "original_max_len": 4096,
                "max_len": 8192,
            }
        )
    )
    assert main(["validate", str(bad), str(other), "--model", str(model_dir)]) == 1
    err = capsys.readouterr().err
    assert "factors: expected 8 values (rotary_dim/2 for rotary_dim=16), got 3" in err
    assert "rope_theta: the set has 500000, the model's base is 10000" in err
    assert main(["validate", str(tmp_path / "nope.json")]) == 1
    assert "cannot read factor file" in capsys.readouterr().err


def test_convert_hf_csv_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {
        **MODEL_CFG,
        "max_position_embeddings": 65536,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 4096,
            "short_factor": [1.0 + i / 10 for i in range(8)],
            "long_factor": [1.0 + i * 2 for i in range(8)],
        },
    }
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    sets_dir = tmp_path / "sets"
    assert main(["convert", str(cfg_path), "--to", "json", "-o", str(sets_dir)]) == 0
    assert sorted(p.name for p in sets_dir.iterdir()) == ["long.json", "short.json"]
    csv_path = tmp_path / "long.csv"
    assert main(["convert", str(sets_dir / "long.json"), "--to", "csv", "-o", str(csv_path)]) == 0
    back = tmp_path / "back.json"
    assert (
        main(
            [
                "convert",
                str(csv_path),
                "--to",
                "json",
                "-o",
                str(back),
                "--rope-theta",
                "10000",
                "--rotary-dim",
                "16",
                "--original-max-len",
                "4096",
                "--max-len",
                "65536",
                "--name",
                "long",
            ]
        )
        == 0
    )
    assert json.loads(back.read_text())["factors"] == cfg["rope_parameters"]["long_factor"]
    assert main(["convert", str(sets_dir / "short.json"), "--to", "hf-config", "--long", str(back)]) == 0
    hf = json.loads(capsys.readouterr().out)
    assert hf["max_position_embeddings"] == 65536
    assert hf["rope_parameters"]["short_factor"] == cfg["rope_parameters"]["short_factor"]
    assert main(["convert", str(csv_path), "--to", "json"]) == 2
    assert "give --model DIR, or all of --rope-theta" in capsys.readouterr().err


def test_plot_writes_png(tmp_path: Path, model_dir: Path) -> None:
    files = []
    for method in ("pi", "ntk", "yarn"):
        f = tmp_path / f"{method}.json"
        assert main(["baseline", method, "--model", str(model_dir), "--target-len", "16384", "-o", str(f)]) == 0
        files.append(str(f))
    png = tmp_path / "plot.png"
    assert main(["plot", *files, "-o", str(png), "--log"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_console_script_help_and_bad_args() -> None:
    exe = Path(sys.executable).parent / "longrope-factors"
    run = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    for word in ("show", "validate", "convert", "baseline", "plot", "angles"):
        assert word in run.stdout
    bad = subprocess.run([str(exe), "angles", "x.json", "--positions", "a,b"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected comma-separated integers" in bad.stderr


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_subcommand_has_help() -> None:
    commands = _subcommands()
    assert set(commands) == {"show", "validate", "convert", "baseline", "plot", "angles"} | {
        "search",
        "eval",
        "passkey",
        "plot-ppl",
    } | {"finetune", "extend", "ruler"}
    for name, p in commands.items():
        text = p.format_help()
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name}: {action.option_strings or action.dest} has no help"
            assert (action.option_strings[-1] if action.option_strings else action.metavar or action.dest) in text
        assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text, name


def test_shared_list_types() -> None:
    from factors.cli.args import float_list, int_list, name_list

    assert int_list()("256, 512,1024") == [256, 512, 1024]
    assert int_list(minimum=0)("4,0,4") == [4, 0, 4]
    assert int_list(minimum=0, unique=True)("8,0,8,2") == [0, 2, 8]
    assert float_list(low=0, high=1)("0,0.5,1") == [0.0, 0.5, 1.0]
    assert name_list(("pi", "ntk"))("pi,ntk,") == ["pi", "ntk"]
    for parse, text, message in (
        (int_list(), "1,x", "expected comma-separated integers, got '1,x'"),
        (int_list(), "0,4", "expected one or more integers > 0"),
        (int_list(), "", "expected one or more integers > 0"),
        (int_list(minimum=0, what="positions"), "-1", "expected one or more positions ≥ 0"),
        (float_list(low=0, high=1), "0.5,2", "[2.0] outside [0, 1]"),
        (float_list(), "a", "expected comma-separated numbers"),
        (name_list(("pi", "ntk")), "pi,yarn", "expected comma-separated names from pi, ntk"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(text)


def test_bad_search_options_fail_before_loading_a_model(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # model_dir holds only a config.json: loading the model would fail with another error
    base = ["search", "--model", str(model_dir), "--target-len", "8192", "--no-progress"]
    assert main([*base, "--population", "3", "--parents", "5"]) == 2
    assert "parents (5) must be ≤ population (3)" in capsys.readouterr().err
    assert main([*base, "--progressive", "2048,16384"]) == 2
    assert "progressive lengths [16384] exceed the target length 8192" in capsys.readouterr().err
    assert main([*base, "--short", "--short-population", "2", "--short-parents", "4"]) == 2
    assert "parents (4) must be ≤ population (2)" in capsys.readouterr().err
    assert main([*base, "--mutations", "0", "--crossovers", "0"]) == 2
    assert "mutations + crossovers must be ≥ 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--seed-methods", "pi,linear"])
    assert exit_info.value.code == 2
    assert "expected comma-separated names from identity, pi, ntk, yarn" in capsys.readouterr().err


def test_search_plan_from_options(model_dir: Path) -> None:
    from factors.cli.search import search_plan

    args = build_parser().parse_args(
        ["search", "--model", str(model_dir), "--target-len", "16384", "--progressive", "8192,4096,16384"]
        + ["--population", "10", "--parents", "4", "--generations", "3", "--short", "--short-generations", "0"]
        + ["--short-samples", "9", "--checkpoint-dir", "ck", "--time-budget", "2", "--table-text", "stdlib:heldout"]
    )
    plan = search_plan(args)
    assert plan.lengths == (4096, 8192, 16384) and plan.progressive
    assert plan.long.target_len == 16384 and plan.long.time_budget_s == 120
    assert (plan.long.population, plan.long.parents, plan.long.generations) == (10, 4, 3)
    assert plan.short is not None and plan.short.target_len == 4096 and plan.short.generations == 0
    assert (plan.short.population, plan.short.parents, plan.short.time_budget_s) == (10, 4, None)
    assert plan.short_samples == 9 and plan.samples == 4 and plan.table_text == "stdlib:heldout"
    assert plan.checkpoint("longrope-short") == Path("ck") / "longrope-short.ckpt.json"
    single = search_plan(build_parser().parse_args(["search", "--model", str(model_dir), "--target-len", "8192"]))
    assert single.lengths == (8192,) and not single.progressive and single.short is None
    assert single.checkpoint("x") is None


def test_cli_args_module_needs_no_torch() -> None:
    code = "import sys, factors.cli.args; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
