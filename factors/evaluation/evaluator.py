"""Perplexity and passkey retrieval of a Hugging Face Llama-family model under a FactorSet.

Hugging Face's own ``longrope`` rope type has no n̂, so the evaluator applies a set itself: the
model's rotary module is replaced by one that returns rows of the set's cos/sin table, built in
float64 by ``factors.rope`` (positions < n̂ keep the original angles, mscale included) and cast to
the model dtype, which is what the server applies too. Long inputs stay within memory: attention
runs through SDPA without a materialised mask, and the loss is computed over chunks of the final
hidden states so a 16k × 49152 logits matrix never exists.

Imports transformers lazily and never vLLM.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factors.baselines import make_baseline
from factors.formats import ModelRope, check_compatible, read_model_rope
from factors.rope import cos_sin
from factors.schema import FactorSet, FactorSetError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FactorSetRotary(nn.Module):
    """Drop-in for HF's rotary module: (cos, sin) rows of a FactorSet's table, HF layout
    ``[batch, seq, rotary_dim]`` (the rotary_dim/2 values repeated twice, as ``rotate_half`` expects)."""

    def __init__(self, fs: FactorSet, rows: int, device: torch.device) -> None:
        super().__init__()
        self.factor_set = fs
        c, s = cos_sin(fs, torch.arange(rows), dtype=torch.float64)
        self.cos = torch.cat([c, c], dim=-1).to(device)
        self.sin = torch.cat([s, s], dim=-1).to(device)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if int(position_ids.max()) >= self.cos.shape[0]:
            raise FactorSetError(
                f"position {int(position_ids.max())} is beyond the {self.cos.shape[0]} rows built for set"
                f" {self.factor_set.name!r}; evaluate with a longer table (rows ≥ sequence length)"
            )
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


@dataclass(frozen=True)
class PasskeyResult:
    length: int
    depth: float
    key: str
    correct: bool
    tokens: int
    key_nll: float = float("nan")  # mean NLL of the key's tokens given the true prefix (nats per token)


class Evaluator:
    """One loaded model; measures perplexity and passkey accuracy under any number of sets."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = None,
        loss_chunk: int = 2048,
    ) -> None:
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        self.rope: ModelRope = read_model_rope(self.model_dir)
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=self.dtype, attn_implementation="sdpa"
        ).to(self.device)
        self.model.eval()
        self.base = self.model.model
        self.stock_rotary = self.base.rotary_emb
        self.loss_chunk = loss_chunk
        self.tokenizer = self._load_tokenizer()
        self._current: tuple[Any, int] | None = None
        self._memo: dict[tuple[str, str], float] = {}

    # -- text -------------------------------------------------------------------------------------

    def _load_tokenizer(self) -> Any:
        if self.model.config.vocab_size == 256:
            # byte-level model: token = UTF-8 byte (its tokenizer files, if any, are factors.fixtures.byte_tokenizer's,
            # which give the same ids; bytes are read directly, without tokenising megabytes of text in Python)
            return None
        if (self.model_dir / "tokenizer.json").exists() or (self.model_dir / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.model_dir)
        raise FactorSetError(f"{self.model_dir}: no tokenizer files and not a byte-level (vocab 256) model")

    def tokenize(self, text: str) -> torch.Tensor:
        """Token ids of a text, 1-D int64 (UTF-8 bytes for a byte-level model)."""
        if self.tokenizer is None:
            return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)

    def detokenize(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        return self.tokenizer.decode(list(ids))

    @staticmethod
    def windows(tokens: torch.Tensor, length: int, samples: int, seed: int) -> torch.Tensor:
        """`samples` windows of `length` tokens at seeded random offsets, shape [samples, length]."""
        if tokens.numel() < length + 1:
            raise ValueError(f"the text has {tokens.numel()} tokens; a {length}-token window needs more text")
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, tokens.numel() - length + 1, (samples,), generator=g).tolist()
        return torch.stack([tokens[s : s + length] for s in starts])

    # -- rotary -----------------------------------------------------------------------------------

    def geometry_set(self, method: str, target_len: int) -> FactorSet:
        """A baseline (identity/pi/ntk/yarn) for this model at a window."""
        return make_baseline(method, self.rope.geometry, target_len, name=f"{method}-{target_len}")

    def use(self, fs: FactorSet | None, rows: int) -> None:
        """Apply a set for sequences up to `rows` tokens (None: the model's stock rotary module)."""
        if fs is None:
            self.base.rotary_emb = self.stock_rotary
            self._current = None
            return
        key = (fs.model_dump_json(exclude={"provenance", "name", "version"}), rows)
        if self._current is not None and self._current[0] == key[0] and self._current[1] >= rows:
            return
        check_compatible(fs, self.rope)
        self.base.rotary_emb = FactorSetRotary(fs, rows, self.device)
        self._current = key

    # -- perplexity -------------------------------------------------------------------------------

    @torch.no_grad()
    def nll(self, batch: torch.Tensor) -> tuple[float, int]:
        """Summed next-token NLL and token count of a [b, L] batch under the current rotary."""
        ids = batch.to(self.device)
        hidden = self.base(input_ids=ids, use_cache=False).last_hidden_state
        targets = ids[:, 1:]
        total = 0.0
        for a in range(0, targets.shape[1], self.loss_chunk):
            b = min(a + self.loss_chunk, targets.shape[1])
            logits = self.model.lm_head(hidden[:, a:b]).float()
            total += float(
                nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, a:b].flatten(), reduction="sum")
            )
        return total, targets.numel()

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, fs: FactorSet | None) -> torch.Tensor:
        """Full logits of a [b, L] batch under a set (None: stock HF rotary); for checks on small inputs."""
        self.use(fs, ids.shape[1])
        return self.model(input_ids=ids.to(self.device), use_cache=False).logits.float()

    def perplexity(self, fs: FactorSet | None, windows: torch.Tensor, batch_size: int = 0) -> float:
        """exp(mean NLL) over every predicted token of every window (all windows one length).

        Memoised per (set geometry, windows): a 16k forward costs minutes on a CPU, and a search's
        seeds and the final table often ask for the same number."""
        key = (
            "stock" if fs is None else fs.model_dump_json(exclude={"provenance", "name", "version"}),
            hashlib.sha256(windows.numpy().tobytes()).hexdigest() + str(tuple(windows.shape)),
        )
        if key in self._memo:
            return self._memo[key]
        self.use(fs, windows.shape[1])
        step = batch_size or self._auto_batch(windows.shape[1])
        total, count = 0.0, 0
        for i in range(0, windows.shape[0], step):
            s, n = self.nll(windows[i : i + step])
            total += s
            count += n
        self._memo[key] = math.exp(total / count)
        return self._memo[key]

    def forget_measurements(self) -> None:
        """Drop the memoised perplexities (the model's weights are about to change, e.g. fine-tuning)."""
        self._memo.clear()

    def _auto_batch(self, length: int) -> int:
        """Windows per forward: keep about 16k tokens of activations per batch."""
        return max(1, 16384 // length)

    def ppl_table(
        self,
        sets: Iterable[FactorSet],
        tokens: torch.Tensor,
        lengths: Sequence[int],
        samples: int,
        seed: int = 0,
    ) -> list[dict[str, Any]]:
        """Records {"set", "length", "ppl"} for every set and length (same windows for every set)."""
        sets = list(sets)
        out = []
        for length in lengths:
            w = self.windows(tokens, length, samples, seed)
            for fs in sets:
                out.append({"set": fs.name, "length": int(length), "ppl": self.perplexity(fs, w)})
        return out

    # -- passkey ----------------------------------------------------------------------------------

    def passkey(
        self,
        fs: FactorSet | None,
        length: int,
        depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        trials: int = 2,
        seed: int = 0,
    ) -> list[PasskeyResult]:
        """LongRoPE's passkey test: a 5-digit key hidden at each depth in ~`length` tokens of filler;
        correct when greedy decoding after "The pass key is" reproduces the key exactly (checked
        teacher-forced: greedy output equals the key iff every key token is the argmax given the
        true prefix). ``key_nll`` grades a miss: the key's mean NLL per token (ln 10 ≈ 2.30 per digit is
        a guess that ignores the needle)."""
        rng = random.Random(seed)
        results = []
        for depth in depths:
            for _ in range(trials):
                key = f"{rng.randint(10000, 99999)}"
                prompt, answer = passkey_prompt(self, length, depth, key)
                ids = torch.cat([prompt, answer]).unsqueeze(0)
                self.use(fs, ids.shape[1])
                with torch.no_grad():
                    hidden = self.base(input_ids=ids.to(self.device), use_cache=False).last_hidden_state
                    start = prompt.numel() - 1
                    logits = self.model.lm_head(hidden[0, start : start + answer.numel()])
                pred = logits.argmax(-1).cpu()
                nll = float(nn.functional.cross_entropy(logits.float().cpu(), answer))
                results.append(PasskeyResult(length, depth, key, bool(torch.equal(pred, answer)), ids.shape[1], nll))
        return results


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it."
    " I will quiz you about the important information there.\n"
)


def passkey_prompt(ev: Evaluator, length: int, depth: float, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, answer ids): task line, filler with the key line at `depth` (0 = start, 1 = end),
    question; the filler is sized so prompt + answer ≈ `length` tokens. Where the task line leaves no room
    (a short window of a byte-level model), the prompt is the filler, the key line and the question alone."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is"
    answer = ev.tokenize(f" {key}")
    task = TASK
    if ev.tokenize(TASK + needle + question + FILLER).numel() + answer.numel() > length:
        task = ""
    fixed = ev.tokenize(task + needle + question).numel() + answer.numel()
    per_filler = max(1, ev.tokenize(FILLER * 8).numel() / 8)
    repeats = max(0, int((length - fixed) / per_filler))
    before = round(repeats * depth)
    text = task + FILLER * before + needle + FILLER * (repeats - before) + question
    prompt = ev.tokenize(text)
    over = prompt.numel() + answer.numel() - length
    while over > 0 and repeats > 0:  # tokenizers merge across repeats; trim to fit
        repeats = max(0, repeats - max(1, math.ceil(over / per_filler)))
        before = round(repeats * depth)
        text = task + FILLER * before + needle + FILLER * (repeats - before) + question
        prompt = ev.tokenize(text)
        over = prompt.numel() + answer.numel() - length
    if over > 0:
        raise ValueError(
            f"a passkey prompt needs at least {prompt.numel() + answer.numel()} tokens with no filler;"
            f" {length} is too short"
        )
    return prompt, answer
