"""``longrope-factors finetune`` on the tiny fixture: a resumed fine-tune equals the uninterrupted one, the
time budget stops it with a checkpoint, another run's checkpoint is refused, and the output folder is a model
with its set and provenance that Hugging Face and the evaluator load."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from factors.cli.main import main
from factors.formats import MODEL_SETS_DIR, load_json_set, model_set_files
from factors.schema import FactorSetError
from factors.training.finetune import Finetuner
from factors.training.plan import FinetuneConfig, step_windows

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


MIXED = FinetuneConfig(
    target_len=256,
    steps=2,
    micro_batch=2,
    grad_accum=2,
    lr=1e-3,
    warmup_steps=1,
    checkpoint_every=1,
    mixed_short=0.5,
    task_ratio=0.5,
    text="stdlib:search",  # smaller than stdlib:train: tokenised and cleaned for haystacks in less time
)


class SpyFinetuner(Finetuner):
    """Records, for every micro-batch it trains on, the set its rotary module applies and the shape."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, int, tuple[int, ...]]] = []

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        rotary = self.ev.base.rotary_emb
        self.seen.append((rotary.factor_set.name, rotary.factor_set.resolved_mscale, tuple(windows.shape)))
        return super().loss(windows)


def test_mixed_batches_are_short_under_the_original_rope_and_hold_task_documents(tmp_path: Path) -> None:
    """LongRoPE2's mixed context windows: short micro-batches (W = 128) under plain RoPE, long ones (256) under
    the set, task documents among both; recorded in finetune.json; a resumed run equals the uninterrupted one."""
    from factors.evaluation.evaluator import Evaluator
    from factors.search.progressive import text_tokens
    from factors.training.plan import step_batches

    torch.use_deterministic_algorithms(True)
    ev = Evaluator(MODEL, threads=1)
    fs = load_json_set(SET)
    ft = SpyFinetuner(ev, fs, MIXED, text_tokens(ev, MIXED.text), checkpoint_dir=tmp_path / "a", progress=False)
    state = ft.run()
    assert state.step == 2 and all(0 < x < 5 for x in state.losses)
    kinds = {(name, shape[1]) for name, _, shape in ft.seen}
    # both windows (+ the next token) in one run, each under its own RoPE
    assert kinds == {("original", 129), (fs.name, 257)}
    assert all(m == 1.0 for name, m, _ in ft.seen if name == "original")
    assert ft.ev.base.rotary_emb.factor_set.name == fs.name  # the long set is applied again after a short batch
    record = ft.record()
    mixed = record["mixed"]
    assert mixed["short_sequences"] + mixed["long_sequences"] == 2 * 4 and mixed["short_sequences"] > 0
    assert 0 < mixed["task_documents"] < 8 and mixed["short_len"] == 128 and mixed["task_fraction"] == 0.5
    assert record["tokens_trained"] == mixed["long_sequences"] * 256 + mixed["short_sequences"] * 128

    # the batches: deterministic per step, exact lengths, task documents end with their answer
    batches = step_batches(ft.tokens, MIXED, 1, 128, ft.task_doc)
    again = step_batches(ft.tokens, MIXED, 1, 128, ft.task_doc)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    docs = [
        ev.detokenize(row.tolist())
        for _, micro, n in (b for step in range(2) for b in step_batches(ft.tokens, MIXED, step, 128, ft.task_doc))
        for row in micro
        if n
    ]
    assert any(d.endswith(">") and "\n?" in d and "<" in d for d in docs)
    assert {micro.shape[1] for _, micro, _ in batches} <= {129, 257}

    # stopped by the time budget after one step, resumed: the same losses and counts
    first = Finetuner(
        Evaluator(MODEL, threads=1),
        fs,
        replace(MIXED, time_budget_s=0.0),
        ft.tokens,
        checkpoint_dir=tmp_path / "b",
        progress=False,
    )
    assert first.run().stopped_by == "time_budget"
    second = Finetuner(Evaluator(MODEL, threads=1), fs, MIXED, ft.tokens, checkpoint_dir=tmp_path / "b", progress=False)
    resumed = second.run(resume=True)
    assert resumed.losses == state.losses and second.record()["mixed"] == mixed


def test_mixed_options_are_validated_and_a_plain_identity_is_kept() -> None:
    assert "mixed_short" not in CONFIG.identity()  # checkpoints of plain fine-tunes stay valid
    assert MIXED.identity()["mixed_short"] == 0.5 and MIXED.mixed and not CONFIG.mixed
    for bad in ({"mixed_short": 1.5}, {"task_ratio": -0.1}, {"tasks": ("bogus",)}, {"short_len": 512}):
        with pytest.raises(ValueError):
            replace(MIXED, **bad).validate()


def test_finetune_command_records_mixed_windows(tmp_path: Path) -> None:
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(MODEL), "--threads", "1", "--set", str(SET), "-o", str(out), "--steps", "1"]
    argv += ["--grad-accum", "4", "--mixed-window", "0.5", "--task-ratio", "1", "--tasks", "niah_single"]
    argv += ["--short-len", "96", "--no-progress"]
    assert main(argv) == 0
    record = json.loads((out / "finetune.json").read_text())
    assert record["mixed"]["tasks"] == ["niah_single"] and record["mixed"]["short_len"] == 96
    assert record["mixed"]["task_documents"] == 4 and record["config"]["mixed_short"] == 0.5
