"""The longrope-factors CLI, run as users run it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from factors.cli import main

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
