"""The phases of an upgraded request: several engine requests that vLLM's serving layer must see as one."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from .vllm_ext.engine_client import output_modes


@dataclass
class UpgradeRecord:
    """One move of a request to a larger set (kept in ``LongRopeEngine.upgrade_log`` for tests and logs)."""

    request_id: str
    from_key: str
    to_key: str
    recompute_tokens: int
    at: float
    seconds: float | None = None  # upgrade → first token under the new set
    cached_tokens: int | None = None  # prefix-cache hits of the recompute (0 unless the new set computed it)


class PhaseJoiner:
    """Presents the phases of an upgraded request to vLLM's serving layer as one request.

    vLLM yields outputs in one of three kinds: DELTA (streaming: new tokens only), CUMULATIVE (all tokens so
    far) and FINAL_ONLY (one output at the end). A phase's outputs only know that phase's tokens; this joins
    them: the request id, prompt and prompt logprobs stay the first phase's, cumulative outputs are prefixed
    with the earlier phases' tokens, text and logprobs, and a phase that ends in an upgrade is not reported as
    finished. A request that never moves gets vLLM's outputs unchanged.
    """

    def __init__(self, request_id: str, output_kind: Any) -> None:
        self.request_id = request_id
        self.delta, self.final_only = output_modes(output_kind)
        self.first: Any = None
        self.done_tokens: list[int] = []
        self.done_text = ""
        self.done_logprobs: Any = None
        self.done_cumulative: float | None = None
        self._reset_phase()

    def _reset_phase(self) -> None:
        self.phase_tokens: Any = []  # DELTA: our list of the deltas; otherwise vLLM's cumulative sequence
        self._text_parts: list[str] = []
        self.phase_logprobs: Any = None
        self.phase_cumulative: float | None = None

    @property
    def tokens(self) -> list[int]:
        return [*self.done_tokens, *self.phase_tokens]

    @property
    def phase_text(self) -> str:
        return "".join(self._text_parts)

    @property
    def tokens_in_phase(self) -> int:
        return len(self.phase_tokens)

    def observe(self, output: Any) -> None:
        if self.first is None:
            self.first = output
        if not output.outputs:
            return
        c = output.outputs[0]
        if self.delta:
            # appended in place: a streamed request's outputs must not cost time quadratic in its length
            self.phase_tokens.extend(c.token_ids)
            self._text_parts.append(c.text)
            if c.logprobs is not None:
                if self.phase_logprobs is None:
                    self.phase_logprobs = copy.copy(c.logprobs)
                else:
                    self.phase_logprobs.extend(c.logprobs)
        else:  # each output holds the whole phase so far: keep references, copy nothing
            self.phase_tokens, self._text_parts, self.phase_logprobs = c.token_ids, [c.text], c.logprobs
        self.phase_cumulative = c.cumulative_logprob

    def phase_ended_at_limit(self, output: Any, phase_max: int) -> bool:
        """The phase stopped because it reached its token limit (not a stop token, string or abort)."""
        c = output.outputs[0] if output.outputs else None
        return c is not None and c.finish_reason == "length" and len(self.phase_tokens) >= phase_max

    def next_phase(self) -> None:
        self.done_tokens += self.phase_tokens
        self.done_text += self.phase_text
        self.done_logprobs = _join_logprobs(self.done_logprobs, self.phase_logprobs)
        if self.phase_cumulative is not None:
            self.done_cumulative = (self.done_cumulative or 0.0) + self.phase_cumulative
        self._reset_phase()

    def present(self, output: Any, phase: int, continuing: bool) -> Any:
        """What the consumer sees for this engine output (None: nothing, a FINAL_ONLY phase that goes on)."""
        if phase == 0 and not continuing:
            return output
        if continuing and self.final_only:
            return None
        shown = copy.copy(output)
        completions = []
        for c in output.outputs:
            if not self.delta and phase > 0:
                c = dataclasses.replace(
                    c,
                    token_ids=self.done_tokens + list(c.token_ids),
                    text=self.done_text + c.text,
                    logprobs=_join_logprobs(self.done_logprobs, c.logprobs),
                )
            if phase > 0 and c.cumulative_logprob is not None and self.done_cumulative is not None:
                c = dataclasses.replace(c, cumulative_logprob=self.done_cumulative + c.cumulative_logprob)
            if continuing:
                c = dataclasses.replace(c, finish_reason=None, stop_reason=None)
            completions.append(c)
        shown.outputs = completions
        shown.request_id = self.request_id
        if continuing:
            shown.finished = False
        if phase > 0:
            shown.prompt = self.first.prompt
            shown.prompt_token_ids = self.first.prompt_token_ids
            shown.prompt_logprobs = None if self.delta else self.first.prompt_logprobs
            shown.num_cached_tokens = self.first.num_cached_tokens
        return shown


def _join_logprobs(head: Any, tail: Any) -> Any:
    if head is None:
        return None if tail is None else copy.copy(tail)
    if tail is None:
        return head
    joined = copy.copy(head)
    joined.extend(tail)
    return joined
