"""``longrope-factors finetune`` on the tiny fixture: a resumed fine-tune equals the uninterrupted one, the
time budget stops it with a checkpoint, another run's checkpoint is refused, and the output folder is a model
with its set and provenance that Hugging Face and the evaluator load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factors.cli.main import main
from factors.formats import MODEL_SETS_DIR, load_json_set, model_set_files
from factors.schema import FactorSetError
from factors.training.finetune import FinetuneConfig, Finetuner, step_windows

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "factors" / "data" / "tiny-short" / "model"
SET = ROOT / "factors" / "data" / "tiny-short" / "sets" / "longrope-256.json"
CONFIG = FinetuneConfig(
    target_len=256, steps=4, micro_batch=2, grad_accum=2, lr=1e-3, warmup_steps=1, checkpoint_every=2
)


def _finetuner(tmp: Path, config: FinetuneConfig = CONFIG) -> Finetuner:
    from factors.evaluation.evaluator import Evaluator
    from factors.search.progressive import text_tokens

    torch.use_deterministic_algorithms(True)
    ev = Evaluator(MODEL, threads=1)
    return Finetuner(ev, load_json_set(SET), config, text_tokens(ev, config.text), checkpoint_dir=tmp, progress=False)


def _weights(ft: Finetuner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ft.model.state_dict().items()}


def test_resumed_finetune_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    whole = _finetuner(tmp_path / "whole")
    state = whole.run()
    assert (state.step, state.stopped_by, len(state.losses)) == (4, "steps", 4)
    assert all(0 < x < 3 for x in state.losses)

    # stopped by the time budget after its first step (a checkpoint is written), then resumed to the end
    first = _finetuner(tmp_path / "split", FinetuneConfig(**{**CONFIG.__dict__, "time_budget_s": 0.0}))
    stopped = first.run()
    assert (stopped.step, stopped.stopped_by) == (1, "time_budget")
    assert (tmp_path / "split" / "finetune.ckpt.pt").exists()
    second = _finetuner(tmp_path / "split")  # a new process would see exactly this: a fresh model + checkpoint
    resumed = second.run(resume=True)
    assert (resumed.step, resumed.stopped_by) == (4, "steps")
    assert resumed.losses == state.losses
    a, b = _weights(whole), _weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["model.layers.0.mlp.up_proj.weight"],
        _finetuner(tmp_path / "fresh").model.state_dict()["model.layers.0.mlp.up_proj.weight"],
    )


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    _finetuner(tmp_path, FinetuneConfig(**{**CONFIG.__dict__, "steps": 2})).run()
    other = _finetuner(tmp_path, FinetuneConfig(**{**CONFIG.__dict__, "lr": 5e-4}))
    with pytest.raises(FactorSetError, match="other settings"):
        other.run(resume=True)


def test_windows_depend_only_on_seed_and_step() -> None:
    tokens = torch.arange(10_000)
    a, b = step_windows(tokens, CONFIG, 3), step_windows(tokens, CONFIG, 3)
    assert torch.equal(a, b) and a.shape == (4, 257)
    assert not torch.equal(a, step_windows(tokens, CONFIG, 4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 256, dtype=a.dtype))  # contiguous text


def test_finetune_command_writes_a_servable_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(MODEL), "--threads", "1", "--set", str(SET), "-o", str(out)]
    argv += ["--steps", "2", "--grad-accum", "2", "--micro-batch", "1", "--lr", "1e-3", "--no-progress"]
    assert main(argv) == 0
    assert f"longrope-serve --model {out}" in capsys.readouterr().err
    record = json.loads((out / "finetune.json").read_text())
    assert record["steps"] == 2 and record["target_len"] == 256 and record["data"] == "stdlib:train"
    assert record["tokens_trained"] == 2 * 2 * 256 and len(record["losses"]) == 2 and record["seconds"] > 0
    assert record["set"] == "longrope-256" and record["stopped_by"] == "steps"
    (set_file,) = model_set_files(out)
    assert set_file.parent.name == MODEL_SETS_DIR
    fs = load_json_set(set_file)
    assert fs.factors == load_json_set(SET).factors and fs.provenance.metrics["finetuned"]["steps"] == 2
    assert json.loads((out / "config.json").read_text()) == json.loads((MODEL / "config.json").read_text())

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.max_position_embeddings == 128  # the set, not the config, makes the longer window
    # not empty and not the source: a second run refuses the folder, a new one would differ
    assert main(argv) == 2
    assert "is not empty" in capsys.readouterr().err
