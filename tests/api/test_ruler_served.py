"""The RULER-style suite served equals the suite offline: the same prompts sent to longrope-serve (OpenAI
completions over HTTP, ``clients.ruler``) and continued by the offline evaluator (Hugging Face under the same
set, ``factors.evaluation.ruler``) give the same continuation for every prompt, hence the same records, on the
retrieval fixture (so accuracy is not zero everywhere); the server routes by length or runs the set a request
names; refusals exit 2; the client loads no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from api.conftest import RunningServer, start_server

from factors.baselines import make_baseline
from factors.evaluation.ruler import Prediction, load_haystack, predict_offline, records
from factors.evaluation.tasks import TASKS, make_suite
from factors.formats import read_model_rope, save_json_set
from factors.schema import FactorSet

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "factors" / "data" / "tiny-retrieval" / "model"  # byte-level, retrieves within W = 256; fp32
W = read_model_rope(MODEL).geometry.original_max_len
LENGTHS = [W - 32, 2 * W - 56, 4 * W - 112]  # each + the longest answer (27 bytes) fits one window below


@pytest.fixture(scope="module")
def sets() -> dict[str, FactorSet]:
    """Served sets by name: the model's own RoPE at W, YaRN at 2W and 4W (routing picks by length)."""
    geo = read_model_rope(MODEL).geometry
    made = [make_baseline("identity", geo, W, "plain"), *(make_baseline("yarn", geo, k * W) for k in (2, 4))]
    return {fs.name: fs for fs in made}


@pytest.fixture(scope="module")
def served(sets: dict[str, FactorSet], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("ruler-sets")
    for fs in sets.values():
        save_json_set(fs, folder / f"{fs.name}.json")
    srv = start_server(MODEL, folder, tmp_path_factory.mktemp("ruler-server"), admin=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def evaluator():
    from factors.evaluation.evaluator import Evaluator

    return Evaluator(MODEL, threads=1)


def _offline(evaluator, sets: dict[str, FactorSet], served_preds: list[Prediction], prompts: list) -> list[Prediction]:
    """The offline predictions of the same prompts, each under the set the server ran it on."""
    out: dict[int, Prediction] = {}
    for name in dict.fromkeys(p.set for p in served_preds):
        mine = [i for i, p in enumerate(served_preds) if p.set == name]
        got = predict_offline(evaluator, sets[name], [prompts[i % len(prompts)] for i in mine])
        out.update(zip(mine, got, strict=True))  # a cell's prompts share a set, so sample indices agree
    return [out[i] for i in range(len(served_preds))]


def test_routed_suite_served_equals_offline(
    served: RunningServer, sets, evaluator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clients.ruler import main

    file = tmp_path / "served.jsonl"
    suite = ["--lengths", ",".join(map(str, LENGTHS)), "--depths", "3", "--samples", "1", "--seed", "3"]
    argv = ["--url", served.base, "--model", "tiny", *suite, "--json", "--no-progress", "--predictions", str(file)]
    assert main([*argv, "--concurrency", "4"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    preds = [Prediction(**json.loads(line)) for line in file.read_text().splitlines()]
    prompts = make_suite(TASKS, LENGTHS, 3, 1, load_haystack("stdlib:heldout"), 3)
    assert [(p.task, p.length, p.depth, p.answer) for p in preds] == [
        (p.task, p.length, p.depth, p.answer) for p in prompts
    ]
    # policy reserve: the smallest window holding prompt + answer budget (≤ 27 bytes)
    assert {(p.length, p.set) for p in preds} == set(
        zip(LENGTHS, ["plain", f"yarn-{2 * W}", f"yarn-{4 * W}"], strict=True)
    )
    assert all(p.prompt_tokens == p.length for p in preds)  # the byte tokenizer: one token per byte
    offline = _offline(evaluator, sets, preds, prompts)
    mismatched = [(s, o) for s, o in zip(preds, offline, strict=True) if s != o]
    assert not mismatched, mismatched[:3]
    assert recs == records(preds) == records(offline)
    assert len(recs) == 4 * 3 * 3
    assert any(p.correct for p in preds)  # the fixture retrieves: equal accuracy is not equal zeros


def test_named_sets_served_equal_offline(served: RunningServer, sets, evaluator) -> None:
    from clients.ruler import served_predictions

    prompts = make_suite(["niah_single", "vt"], LENGTHS[:2], [0.0, 1.0], 1, load_haystack("stdlib:heldout"), 4)
    names = [f"yarn-{4 * W}", f"yarn-{2 * W}"]  # windows routing would not pick for the shortest prompts
    preds = served_predictions(served.base, "tiny", prompts, names, concurrency=4, progress=False)
    assert [p.set for p in preds] == [n for n in names for _ in prompts]
    assert preds == _offline(evaluator, sets, preds, prompts)
    # english template: lengths in the server's tokens (vLLM's /tokenize), the same prompts offline
    from clients.ruler import token_counter

    count = token_counter(served.base, "tiny")
    english = make_suite(["niah_single"], LENGTHS[2:], [0.5], 1, load_haystack("stdlib:heldout"), 4, "english", count)
    assert count(english[0].prompt) <= LENGTHS[2] and "Question:" in english[0].prompt
    got = served_predictions(served.base, "tiny", english, [f"yarn-{4 * W}"], progress=False)
    assert got == _offline(evaluator, sets, got, english)


@pytest.mark.parametrize(
    "change,message",
    [
        (["--set", "nosuch"], "is not a live factor set"),
        (["--set", "plain", "--lengths", str(LENGTHS[1])], "window"),
    ],
)
def test_refusals_exit_2(
    served: RunningServer, change: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from clients.ruler import main

    argv = ["--url", served.base, "--tasks", "niah_single", "--lengths", str(LENGTHS[0]), "--depths", "1"]
    assert main([*argv, "--samples", "1", "--no-progress", *change]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "(HTTP 400)" in err


def test_no_server_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    from clients.launch import free_port
    from clients.ruler import main

    argv = ["--url", f"http://127.0.0.1:{free_port()}", "--model", "tiny", "--lengths", str(W), "--depths", "1"]
    assert main([*argv, "--samples", "1", "--no-progress"]) == 3
    assert "no longrope-serve answered" in capsys.readouterr().err


def test_client_suite_loads_no_torch() -> None:
    probe = (
        "import sys, clients.ruler; clients.ruler.build_parser().format_help(); "
        "print([m for m in ('torch', 'numpy', 'transformers', 'matplotlib', 'vllm') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]"]
