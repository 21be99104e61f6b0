"""The window guard on the shipped retrieval fixtures: the weights it leaves are the blend it records, the α it
keeps is the largest that meets its target (or, if none does, the most accurate one), it refuses a source
that retrieves nothing, and ``finetune --keep-window`` records it. Nothing is trained here but one step."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factors.cli.main import main
from factors.evaluation.evaluator import Evaluator
from factors.training.plan import FinetuneConfig
from factors.training.window_guard import WindowGuard, guard_prompts, in_window_accuracy, keep_window

ROOT = Path(__file__).resolve().parents[3]
BASE = ROOT / "factors" / "data" / "tiny-retrieval" / "model"
TUNED = ROOT / "factors" / "data" / "tiny-retrieval-extended" / "model"
SHORT = ROOT / "factors" / "data" / "tiny-short" / "model"
SMALL = WindowGuard(keep=0.98, samples=2, depths=3, step=0.25, floor=0.25)  # 24 prompts, α 1 … 0.25


def _tuned_in_place(source: Path = BASE, weights: Path = TUNED) -> Evaluator:
    """An evaluator of ``source`` whose parameters are another model's: a fine-tune of it, as the guard sees one."""
    ev = Evaluator(source, threads=1)
    state = load_file(weights / "model.safetensors")
    with torch.no_grad():
        for name, p in ev.model.named_parameters():
            p.copy_(state[name])
    return ev


def _params(ev: Evaluator) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ev.model.named_parameters()}


def test_alphas_run_from_one_down_to_the_floor_and_bad_settings_are_refused() -> None:
    assert WindowGuard().alphas() == [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
    assert SMALL.alphas() == [1.0, 0.75, 0.5, 0.25]
    for bad in ({"keep": 1.5}, {"samples": 0}, {"depths": 0}, {"step": 0.0}, {"floor": 1.0}):
        with pytest.raises(ValueError):
            replace(SMALL, **bad).validate()
    # the guard acts after training: a checkpoint does not depend on it
    assert FinetuneConfig(target_len=256, keep_window=0.98).identity() == FinetuneConfig(target_len=256).identity()
    with pytest.raises(ValueError, match="keep_window"):
        FinetuneConfig(target_len=256, keep_window=2.0).validate()


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_the_guard_keeps_the_largest_alpha_that_meets_its_target_and_leaves_that_blend(keep: float) -> None:
    guard = replace(SMALL, keep=keep)
    ev = _tuned_in_place()
    tuned = _params(ev)
    source = {n: p.detach() for n, p in Evaluator(BASE, threads=1).model.named_parameters()}
    record = keep_window(ev, guard)

    tried = record["tried"]
    assert [t["alpha"] for t in tried] == guard.alphas()[: len(tried)]
    assert record["target"] == pytest.approx(keep * record["source_accuracy"], abs=1e-6)
    if record["met"]:  # every α before the chosen one missed the target; the chosen one (the last tried) meets it
        assert all(t["accuracy"] < record["target"] for t in tried[:-1])
        assert tried[-1]["alpha"] == record["alpha"] and tried[-1]["accuracy"] >= record["target"]
    else:
        assert len(tried) == len(guard.alphas()) and all(t["accuracy"] < record["target"] for t in tried)
        assert record["accuracy"] == max(t["accuracy"] for t in tried)
    if keep == 0.5:  # the fine-tuned fixture keeps far more than half the window: its own weights stay
        assert record["met"] and record["alpha"] == 1.0
    a = record["alpha"]
    for n, p in ev.model.named_parameters():
        torch.testing.assert_close(p.detach(), a * tuned[n] + (1 - a) * source[n], rtol=0, atol=1e-6)
    # the recorded accuracy is that of the weights left in the model
    assert in_window_accuracy(ev, guard_prompts(ev, guard))[0] == pytest.approx(record["accuracy"], abs=1e-6)


def test_a_source_that_retrieves_nothing_is_refused_and_the_weights_stay_tuned() -> None:
    ev = _tuned_in_place(SHORT, SHORT)
    before = _params(ev)
    with pytest.raises(ValueError, match="retrieves none of 24 in-window task prompts"):
        keep_window(ev, SMALL)
    for n, p in ev.model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_finetune_command_records_the_window_guard(tmp_path: Path) -> None:
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(BASE), "--threads", "1", "-o", str(out), "--no-progress"]
    argv += ["--set", str(BASE / "longrope-sets" / "longrope-2048.json"), "--target-len", "256", "--steps", "1"]
    argv += ["--grad-accum", "1", "--lr", "1e-5", "--keep-window", "0.98", "--keep-window-samples", "1"]
    assert main(argv) == 0
    record = json.loads((out / "finetune.json").read_text())
    guard = record["window_guard"]
    assert guard["keep"] == 0.98 and guard["text"] == "stdlib:search" and guard["prompts"] == 44
    assert guard["length"] == 224 and guard["alpha"] == guard["tried"][-1]["alpha"]
    assert record["config"]["keep_window"] == 0.98
    # what was saved is the blend the guard left
    ev = Evaluator(out, threads=1)
    assert in_window_accuracy(ev, guard_prompts(ev, WindowGuard(samples=1)))[0] == pytest.approx(guard["accuracy"])


def test_an_extend_plan_names_its_guard_and_an_unguarded_plan_keeps_its_identity() -> None:
    from factors.search.evolution import SearchConfig, SearchPlan
    from factors.training.extend import ExtendPlan

    search = SearchPlan(long=SearchConfig(target_len=256), short=SearchConfig(target_len=128))
    plain = ExtendPlan(search=search, finetune=FinetuneConfig(target_len=256), next_target=512)
    guarded = replace(plain, finetune=FinetuneConfig(target_len=256, keep_window=0.98, keep_window_text="x.txt"))
    assert "window_guard" not in plain.identity()
    assert guarded.identity()["window_guard"] == {
        "keep_window": 0.98,
        "keep_window_text": "x.txt",
        "keep_window_samples": 24,
    }
    assert {k: v for k, v in guarded.identity().items() if k != "window_guard"} == plain.identity()
