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
        FinetuneConfig(target_len=256, keep_window=2.0, mixed_short=0.25).validate()
    with pytest.raises(ValueError, match="needs mixed_short"):  # it measures the window under the original RoPE
        FinetuneConfig(target_len=256, keep_window=0.98).validate()


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


def test_a_source_that_retrieves_nothing_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(SHORT), "--threads", "1", "-o", str(out), "--no-progress", "--steps", "1"]
    argv += ["--set", str(ROOT / "factors" / "data" / "tiny-short" / "sets" / "longrope-256.json")]
    argv += ["--mixed-window", "0.5", "--keep-window", "0.98", "--keep-window-samples", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "window guard:" in err and "retrieves none of 44 in-window task prompts" in err
    assert not out.with_name("ft.ckpt").exists() and not out.exists()  # nothing trained, nothing written


def test_a_source_that_retrieves_nothing_is_refused_and_the_weights_stay_tuned() -> None:
    ev = _tuned_in_place(SHORT, SHORT)
    before = _params(ev)
    with pytest.raises(ValueError, match="retrieves none of 24 in-window task prompts"):
        keep_window(ev, SMALL)
    for n, p in ev.model.named_parameters():
        assert torch.equal(p.detach(), before[n])


@pytest.mark.parametrize("keep", [0.95, 0.98])
def test_finetune_command_records_the_window_guard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keep: float
) -> None:
    """A fine-tune at a learning rate that hurts the window (4 steps at 3e-3) is blended back: the saved
    weights are α·(the checkpoint's trained weights) + (1 − α)·(the source's), with the α it records — the
    largest that meets the target (0.95), or, when none does (0.98), the most accurate, said so."""
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(BASE), "--threads", "1", "-o", str(out), "--no-progress"]
    argv += ["--set", str(BASE / "longrope-sets" / "longrope-2048.json"), "--target-len", "256", "--steps", "4"]
    argv += ["--grad-accum", "1", "--lr", "3e-3", "--warmup", "1", "--mixed-window", "0.5", "--task-ratio", "0.5"]
    argv += ["--keep-window", str(keep), "--keep-window-samples", "1"]
    assert main(argv) == 0
    record = json.loads((out / "finetune.json").read_text())
    guard, tried = record["window_guard"], record["window_guard"]["tried"]
    assert guard["keep"] == keep and guard["text"] == "stdlib:search" and guard["prompts"] == 44
    assert guard["length"] == 224 and record["config"]["keep_window"] == keep
    assert tried[0]["alpha"] == 1.0 and tried[0]["accuracy"] < guard["target"]  # the fine-tune hurt the window
    assert all(t["accuracy"] < guard["target"] for t in tried[:-1])
    err = capsys.readouterr().err
    if guard["met"]:
        assert guard["alpha"] == tried[-1]["alpha"] and tried[-1]["accuracy"] >= guard["target"]
    else:
        assert len(tried) == len(WindowGuard().alphas()) and "not met" in err
        assert guard["accuracy"] == max(t["accuracy"] for t in tried)
    assert f"kept α {guard['alpha']:g}" in err
    a = guard["alpha"]
    assert a < 1
    trained = torch.load(out.with_name("ft.ckpt") / "finetune.ckpt.pt", weights_only=False)["model"]
    source, saved = load_file(BASE / "model.safetensors"), load_file(out / "model.safetensors")
    for name, w in saved.items():
        torch.testing.assert_close(w, a * trained[name] + (1 - a) * source[name], rtol=0, atol=1e-6)
    ev = Evaluator(out, threads=1)
    assert in_window_accuracy(ev, guard_prompts(ev, WindowGuard(samples=1)))[0] == pytest.approx(guard["accuracy"])


def test_an_extend_plan_names_its_guard_and_an_unguarded_plan_keeps_its_identity() -> None:
    from factors.search.evolution import SearchConfig, SearchPlan
    from factors.training.extend_plan import ExtendPlan

    search = SearchPlan(long=SearchConfig(target_len=256), short=SearchConfig(target_len=128))
    mixed = FinetuneConfig(target_len=256, mixed_short=0.25)
    plain = ExtendPlan(search=search, finetune=mixed, next_target=512)
    guarded = replace(plain, finetune=replace(mixed, keep_window=0.98, keep_window_text="x.txt"))
    assert "window_guard" not in plain.identity()
    assert guarded.identity()["window_guard"] == {
        "keep_window": 0.98,
        "keep_window_text": "x.txt",
        "keep_window_samples": 24,
    }
    assert {k: v for k, v in guarded.identity().items() if k != "window_guard"} == plain.identity()
    # the guard never chooses on the report's text
    with pytest.raises(ValueError, match="share stdlib:heldout"):
        replace(guarded, finetune=replace(guarded.finetune, keep_window_text="stdlib:search+stdlib:heldout"))
    # a next search on needles puts the needle documents' settings into the identity, as a first one does
    assert "objective" not in plain.identity()["search"]
    assert replace(plain, next_objective="needle-ppl").identity()["search"]["objective"]["tasks"] == list(
        search.needle_tasks
    )
