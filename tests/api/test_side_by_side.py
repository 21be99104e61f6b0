"""The side-by-side benchmark (``clients.side_by_side``): its stock-long config copy is the Phi-3-style block
of the folder's short and long sets, its verdict compares every bucket, and one real run over three real
servers (longrope-serve, stock vLLM with the block, stock vLLM with the short window) measures what each
does: in the window longrope-serve and stock-short give the same NLL (same weights, same RoPE) while
stock-long's long factors change it; past the window stock-short refuses and the others answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clients.served_buckets import Bucket, Cell, summarise
from clients.side_by_side import write_stock_long_folder
from factors.baselines import make_baseline
from factors.formats import MODEL_SETS_DIR, load_any, read_model_rope, save_json_set

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "factors" / "data" / "tiny-retrieval" / "model"
W = read_model_rope(MODEL).geometry.original_max_len


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The retrieval fixture with a short tier (the model's own RoPE) and a YaRN 4W tier with n̂ = 8."""
    out = tmp_path_factory.mktemp("sbs-model")
    for item in MODEL.iterdir():
        if item.is_file():
            (out / item.name).symlink_to(item)
    geo = read_model_rope(MODEL).geometry
    (out / MODEL_SETS_DIR).mkdir()
    save_json_set(make_baseline("identity", geo, W, "short"), out / MODEL_SETS_DIR / "short.json")
    long = make_baseline("yarn", geo, 4 * W).model_copy(update={"n_hat": 8})
    save_json_set(long, out / MODEL_SETS_DIR / "long.json")
    return out


def test_stock_long_copy_carries_the_phi3_block_without_n_hat(folder: Path, tmp_path: Path) -> None:
    sets = {fs.name: fs for p in sorted((folder / MODEL_SETS_DIR).glob("*.json")) for fs in load_any(p)}
    block = write_stock_long_folder(folder, tmp_path / "copy", sets["short"], sets[f"yarn-{4 * W}"])
    copy = tmp_path / "copy"
    assert not (copy / MODEL_SETS_DIR).exists()
    assert (copy / "model.safetensors").resolve() == (MODEL / "model.safetensors").resolve()
    config = json.loads((copy / "config.json").read_text())
    rope = config["rope_parameters"]
    assert rope["rope_type"] == "longrope" and config["max_position_embeddings"] == 4 * W
    assert rope["original_max_position_embeddings"] == W
    assert rope["long_factor"] == list(sets[f"yarn-{4 * W}"].factors) and rope["short_factor"] == [1.0] * 16
    assert block["rope_parameters"] == rope
    short, long = load_any(copy / "config.json")  # the project reads it back: n̂ dropped, factors kept
    assert long.n_hat == 0 and list(long.factors) == list(sets[f"yarn-{4 * W}"].factors)


def _cell(correct: int, nll: float | None, refused: int = 0) -> Cell:
    c = Cell(prompts=4, correct=correct, refused=refused, nll_windows=2)
    if nll is None:
        c.nll_refused = 2
    else:
        c.nll_sum, c.nll_tokens = nll * 10, 10
    return c


def test_verdict_needs_accuracy_and_nll_in_every_bucket() -> None:
    good = Bucket(
        224, True, {"longrope-serve": _cell(4, 1.0), "stock-long": _cell(4, 1.2), "stock-short": _cell(4, 1.0)}
    )
    long = Bucket(
        900, False, {"longrope-serve": _cell(3, 2.0), "stock-long": _cell(2, 2.5), "stock-short": _cell(0, None, 4)}
    )
    v = summarise([good, long])
    assert v["ok"] and v["buckets"][1]["stock-short"]["nll_gain"] is None
    assert v["buckets"][0]["stock-long"]["nll_gain"] == pytest.approx(0.2)
    rounding = Bucket(900, False, {"longrope-serve": _cell(3, 2.50001), "stock-long": _cell(3, 2.5)})
    assert summarise([rounding])["ok"]  # the same set on both: equal within fp32 rounding of the angles
    worse = Bucket(900, False, {"longrope-serve": _cell(3, 2.6), "stock-long": _cell(2, 2.5)})
    assert not summarise([good, worse])["ok"]  # better accuracy, worse NLL: not at least as good
    fewer = Bucket(900, False, {"longrope-serve": _cell(1, 2.0), "stock-long": _cell(2, 2.5)})
    assert not summarise([fewer])["ok"]


@pytest.mark.engine
def test_three_servers_side_by_side(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "clients.side_by_side", "--model", str(folder), "--lengths", f"{W - 32},{3 * W}"]
    cmd += [
        "--tasks",
        "niah_single",
        "--depths",
        "3",
        "--samples",
        "1",
        "--nll-windows",
        "2",
        "--nll-tokens",
        "2048",
        "--json",
        str(out),
    ]
    cmd += ["--work", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    report = json.loads(out.read_text())
    inwin, long = report["buckets"]
    assert inwin["in_window"] and not long["in_window"]
    ours, stock_long, stock_short = (inwin[s] for s in ("longrope-serve", "stock-long", "stock-short"))
    assert ours["nll"] == pytest.approx(stock_short["nll"], abs=1e-4)  # same weights, same RoPE in the window
    assert abs(stock_long["nll"] - ours["nll"]) > 1e-3  # the long factors on every request change it
    assert ours["accuracy"] == stock_short["accuracy"] == 1.0
    assert long["stock-short"]["refused"] == long["stock-short"]["prompts"] == 3 and long["stock-short"]["nll"] is None
    assert long["longrope-serve"]["refused"] == long["stock-long"]["refused"] == 0
    assert long["longrope-serve"]["nll"] is not None and long["stock-long"]["nll"] is not None
    assert report["verdict"]["ok"] == (done.returncode == 0)
    assert "longrope-serve ≥ every stock configuration in every bucket" in done.stdout
