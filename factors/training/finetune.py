"""Fine-tuning a Hugging Face causal LM at a target length under one factor set (LongRoPE's second step).

The set is applied exactly as the evaluator and the server apply it (``Evaluator.use``: float64 angles,
n̂, mscale, cast once), so a model trained here is served with the same numbers it was trained under.

A plain torch loop: AdamW, linear warm-up then cosine decay, gradient accumulation, gradient clipping.

Mixed context window training (LongRoPE2, arXiv 2502.20082): with ``mixed_short`` > 0 a fraction of the
micro-batches are short sequences (the model's own window W) trained under the *original* RoPE, the rest long
ones (``target_len``) under the set, in the same run — so the model learns the rescaled angles at length
without unlearning the angles it is served with in the window. With ``task_ratio`` > 0 that fraction of the
sequences are task documents (``factors.evaluation.tasks``, compact format, a random task and depth, front-
filled with the window's own text to the exact length): the retrieval the long window is for is trained too.
Every optimiser step draws its windows from the text with a generator seeded by (seed, step), so the
data of step k does not depend on what ran before it; with the model and optimiser state in the
checkpoint (written atomically every ``checkpoint_every`` steps and when the time budget stops the run), a
resumed run reproduces the uninterrupted one exactly (CPU, deterministic algorithms, same thread count).

With ``keep_window`` > 0, once the last step is done, the window guard (:mod:`.window_guard`) blends the
weights back toward the source until the window keeps that share of its task accuracy.

The output is a model folder ``longrope-serve`` serves as it is: the weights, the source's config and
tokenizer, the set under ``longrope-sets/`` (:data:`factors.formats.MODEL_SETS_DIR`, which the server
loads with the model) and ``finetune.json``, the provenance record (data, steps, lengths, losses, seconds).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factors.baselines import identity_set
from factors.evaluation.evaluator import Evaluator, FactorSetRotary
from factors.formats import MODEL_SETS_DIR, save_json_set
from factors.schema import FactorSet, FactorSetError
from factors.training.plan import FinetuneConfig, step_batches
from factors.training.window_guard import SourceWindow, keep_window, source_accuracy

CHECKPOINT_NAME = "finetune.ckpt.pt"
RECORD_NAME = "finetune.json"
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


@dataclass
class FinetuneState:
    step: int = 0  # optimiser steps done
    losses: list[float] = field(default_factory=list)  # mean training loss of each step
    elapsed_s: float = 0.0
    stopped_by: str | None = None  # "steps" | "time_budget"
    long_sequences: int = 0  # sequences trained at target_len under the set
    short_sequences: int = 0  # sequences trained at short_len under the original RoPE
    task_documents: int = 0  # of those, task documents


class Finetuner:
    """One fine-tune of ``ev``'s model under ``fs``; ``run()`` trains, ``save(out)`` writes the model folder."""

    def __init__(
        self,
        ev: Evaluator,
        fs: FactorSet,
        config: FinetuneConfig,
        tokens: torch.Tensor,
        *,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        config.validate()
        if fs.max_len < config.target_len:
            raise FactorSetError(
                f"set {fs.name!r} has window {fs.max_len}; fine-tuning at {config.target_len} tokens needs a set"
                " whose window holds them"
            )
        self.ev, self.fs, self.cfg, self.tokens = ev, fs, config, tokens
        self.checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
        self.progress = progress
        self.model = ev.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.state = FinetuneState()
        self.guard_record: dict[str, Any] | None = None  # what the window guard chose (keep_window > 0)
        self._guard_source: SourceWindow | None = None  # the guard's prompts and the source's accuracy on them
        self.short_len = config.short_len or min(config.target_len, ev.rope.geometry.original_max_len)
        self._short_rotary: FactorSetRotary | None = None
        if config.mixed_short > 0:
            plain = identity_set(ev.rope.geometry, name="original", max_len=self.short_len)
            self._short_rotary = FactorSetRotary(plain, self.short_len, ev.device)

    def task_doc(self, window: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """A task document of ``window``'s length: a random task at a random depth, front-filled with the
        window's own first tokens (compact format; loss on every token, as the fixture was pretrained)."""
        from factors.search.objective import fit_document, haystack_text

        n = window.numel()
        task = rng.choice(list(self.cfg.tasks))
        hay = haystack_text(self.cfg.task_text or self.cfg.text)
        doc = fit_document(self.ev, task, n, rng.random(), hay, rng, "compact", None, "train")
        return torch.cat([window[: n - doc.ids.numel()], doc.ids])

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of a micro-batch, computed over chunks of the last hidden states (so the
        logits of a long window are never all materialised at once in the loss)."""
        ids = windows.to(self.ev.device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        hidden = self.ev.base(input_ids=inputs, use_cache=False).last_hidden_state
        total = hidden.new_zeros((), dtype=torch.float32)
        for a in range(0, targets.shape[1], self.ev.loss_chunk):
            b = min(a + self.ev.loss_chunk, targets.shape[1])
            logits = self.model.lm_head(hidden[:, a:b]).float()
            total = total + nn.functional.cross_entropy(
                logits.flatten(0, 1), targets[:, a:b].flatten(), reduction="sum"
            )
        return total / targets.numel()

    def run(self, resume: bool = False) -> FinetuneState:
        """Train until ``steps`` or the time budget (checked after each step); resumable from the checkpoint."""
        if self.cfg.keep_window > 0 and self._guard_source is None:
            try:  # the weights are still the source's: a guard that cannot work fails before any training
                self._guard_source = source_accuracy(self.ev, self.cfg.guard, self.cfg.tasks)
            except (ValueError, OSError) as err:
                raise FactorSetError(f"window guard: {err}") from None
        if resume:
            self.load_checkpoint()
        cfg, st = self.cfg, self.state
        if st.step >= cfg.steps:
            st.stopped_by = "steps"
            self.keep_window()
            return st
        self.ev.use(self.fs, cfg.target_len)
        self.ev.forget_measurements()  # the weights change: no perplexity measured before holds
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.steps, initial=st.step, desc=f"fine-tune {self.fs.name} @ {cfg.target_len}", unit="step"
            )
        t0 = time.monotonic() - st.elapsed_s
        try:
            long_rotary = self.ev.base.rotary_emb
            while st.step < cfg.steps:
                batches = step_batches(
                    self.tokens, cfg, st.step, self.short_len, self.task_doc if cfg.task_ratio > 0 else None
                )
                for group in self.optimizer.param_groups:
                    group["lr"] = cfg.lr_at(st.step)
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for short, micro, docs in batches:
                    # short sequences under the original RoPE, long ones under the set (LongRoPE2's mixed windows)
                    self.ev.base.rotary_emb = self._short_rotary if short and self._short_rotary else long_rotary
                    try:
                        loss = self.loss(micro) / cfg.grad_accum
                        loss.backward()
                    finally:
                        self.ev.base.rotary_emb = long_rotary
                    step_loss += float(loss.detach())
                    rows = micro.shape[0]
                    st.short_sequences += rows if short else 0
                    st.long_sequences += 0 if short else rows
                    st.task_documents += docs
                if not math.isfinite(step_loss):
                    raise FactorSetError(f"training loss is {step_loss} at step {st.step}; lower --lr")
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                st.step += 1
                st.losses.append(step_loss)
                st.elapsed_s = time.monotonic() - t0
                if bar is not None:
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{cfg.lr_at(st.step - 1):.2e}", refresh=False)
                    bar.update(1)
                over_budget = cfg.time_budget_s is not None and st.elapsed_s >= cfg.time_budget_s
                if over_budget and st.step < cfg.steps:
                    st.stopped_by = "time_budget"
                    self.save_checkpoint()
                    return st
                if st.step % cfg.checkpoint_every == 0 or st.step == cfg.steps:
                    self.save_checkpoint()
        finally:
            self.model.eval()
            if bar is not None:
                bar.close()
        st.stopped_by = "steps"
        self.keep_window()
        return st

    def keep_window(self) -> None:
        """Once the training is done, the window guard (:mod:`.window_guard`, with ``keep_window`` > 0): the
        weights blended back toward the source until the window keeps its accuracy. The checkpoint keeps the
        trained weights, so a resumed run chooses the same blend."""
        if self.cfg.keep_window <= 0 or self.guard_record is not None:
            return
        self.optimizer.zero_grad(set_to_none=True)  # training is over: room for the guard's two copies
        self.optimizer.state.clear()
        try:
            self.guard_record = keep_window(self.ev, self.cfg.guard, self.cfg.tasks, self._guard_source)
        except ValueError as err:
            raise FactorSetError(f"window guard: {err}") from None

    # -- checkpoint --------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {
            "config": self.cfg.identity(),
            "set": self.fs.model_dump(mode="json", exclude={"provenance"}),
            "source": str(self.ev.model_dir),
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "identity": self._identity(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": asdict(self.state),
        }
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.checkpoint)

    def load_checkpoint(self) -> None:
        """Continue from the checkpoint, if there is one; refuse one written by another run."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return
        payload = torch.load(self.checkpoint, map_location=self.ev.device, weights_only=False)
        if payload.get("identity") != self._identity():
            raise FactorSetError(
                f"{self.checkpoint} was written by a fine-tune with other settings, set or model; remove it or"
                " use another --checkpoint-dir"
            )
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.state = FinetuneState(**payload["state"])

    # -- output ------------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        return {
            "source_model": str(self.ev.model_dir),
            "set": self.fs.label if self.fs.version is not None else self.fs.name,
            "data": cfg.text,
            "target_len": cfg.target_len,
            "steps": st.step,
            "steps_planned": cfg.steps,
            "windows_per_step": cfg.micro_batch * cfg.grad_accum,
            "tokens_trained": st.long_sequences * cfg.target_len + st.short_sequences * self.short_len,
            "losses": [round(x, 6) for x in st.losses],
            "first_loss": st.losses[0] if st.losses else None,
            "last_loss": st.losses[-1] if st.losses else None,
            "seconds": round(st.elapsed_s, 3),
            "stopped_by": st.stopped_by,
            "device": str(self.ev.device),
            "dtype": str(self.ev.dtype).removeprefix("torch."),
            "config": asdict(cfg),
            "mixed": self.mixed_record(),
            "window_guard": self.guard_record,
        }

    def mixed_record(self) -> dict[str, Any] | None:
        """What mixed context window training did (None for a plain fine-tune)."""
        cfg, st = self.cfg, self.state
        if not cfg.mixed:
            return None
        return {
            "short_fraction": cfg.mixed_short,
            "short_len": self.short_len,
            "short_rope": "original (λ = 1, mscale 1)",
            "long_len": cfg.target_len,
            "long_rope": self.fs.name,
            "short_sequences": st.short_sequences,
            "long_sequences": st.long_sequences,
            "task_fraction": cfg.task_ratio,
            "tasks": list(cfg.tasks),
            "task_text": cfg.task_text or cfg.text,
            "task_documents": st.task_documents,
        }

    def save(self, out: str | Path) -> Path:
        """Write the model folder: weights, config, tokenizer, the set under longrope-sets/, finetune.json."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.ev.use(None, 0)  # the stock rotary module back, so nothing of the evaluator's is saved
        self.model.save_pretrained(out, safe_serialization=True)
        for name in COPIED_FILES:
            src = self.ev.model_dir / name
            if src.exists() and not (out / name).exists():
                shutil.copy2(src, out / name)
        record = self.record()
        prov = self.fs.provenance.model_copy(
            update={
                "metrics": {
                    **self.fs.provenance.metrics,
                    "finetuned": {k: v for k, v in record.items() if k != "losses"},
                }
            }
        )
        sets_dir = out / MODEL_SETS_DIR
        sets_dir.mkdir(exist_ok=True)
        save_json_set(self.fs.with_updates(provenance=prov), sets_dir / f"{self.fs.name}.json")
        tmp = out / f"{RECORD_NAME}.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, out / RECORD_NAME)
        return out
