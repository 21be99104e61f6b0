"""The engine worker's side of per-request LongRoPE: which sets it holds, and each step's fill.

:class:`LongRopeState` gives every set version a *slot* (its few parameters, see
:class:`factors.rope.StepRope`) and, once per step, writes each scheduled token's cos/sin from its position
and its request's slot. :class:`LongRopeWorkerExtension` is vLLM's ``worker_extension_cls``: the methods
``collective_rpc`` calls between steps to load or release a set. A load is a write of a few hundred numbers,
whatever the window; a released version keeps its slot until the last request the runner knows of it ends.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import numpy as np
import torch

from factors.schema import FactorSet, parse_factor_set

from .keys import EXTRA_ARGS_KEY
from .rotary import StepRotaryEmbedding

logger = logging.getLogger("vllm.longrope")  # under "vllm." so worker processes show it


def request_set(state: Any) -> str | None:
    """The set label a runner's request state carries (``sampling_params.extra_args``)."""
    params = getattr(state, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(EXTRA_ARGS_KEY)


class LongRopeState:
    """The sets one worker holds (label → slot) and the per-step fill of the rotary buffers."""

    def __init__(self, runner: Any, rotaries: list[StepRotaryEmbedding]) -> None:
        self.runner = runner
        self.rotaries = rotaries
        self.slot_of: dict[str, int] = {}
        self.window_of: dict[str, int] = {}  # label -> the set's window (max_len)
        self.drafts_trimmed = 0  # draft tokens cut because they would have run past their set's window
        self.retiring: set[str] = set()
        self._free: list[int] = []
        device = rotaries[0].step_buffer.device
        self.token_slots = torch.zeros(rotaries[0].step_buffer.shape[0], dtype=torch.int64, device=device)

    # -- set management (between steps: collective_rpc, or at load)
    def load(self, fs: FactorSet) -> dict[str, Any]:
        key = fs.label
        if key in self.slot_of:  # e.g. a rollback to a version still draining: it keeps its slot
            self.retiring.discard(key)
            return {"key": key, "slot": self.slot_of[key], "loaded": False}
        slot = self._free.pop() if self._free else len(self.slot_of)
        try:
            for rotary in self.rotaries:
                rotary.put(slot, fs)
        except BaseException:
            self._free.append(slot)
            raise
        self.slot_of[key] = slot
        self.window_of[key] = fs.max_len
        logger.info("LongRoPE set %s (window %d) loaded into slot %d", key, fs.max_len, slot)
        return {"key": key, "slot": slot, "loaded": True}

    def release(self, key: str) -> None:
        """Drop a version once no request the runner knows uses it (now, or at a later step)."""
        if key in self.slot_of:
            self.retiring.add(key)
            self._drop_retired()

    def _drop_retired(self) -> None:
        in_use = {request_set(state) for state in self.runner.requests.values()}
        for key in [k for k in self.retiring if k not in in_use]:
            self._free.append(self.slot_of.pop(key))
            self.window_of.pop(key, None)
            self.retiring.discard(key)
            logger.info("LongRoPE set %s dropped (no request uses it)", key)

    def rope_bytes(self) -> int:
        return sum(r.nbytes() for r in self.rotaries) + self.token_slots.numel() * self.token_slots.element_size()

    def status(self) -> dict[str, Any]:
        return {
            "slots": {key: {"slot": slot} for key, slot in self.slot_of.items()},
            "retiring": sorted(self.retiring),
            "rope_bytes": self.rope_bytes(),
            "step_tokens": int(self.token_slots.shape[0]),
            "drafts_trimmed": self.drafts_trimmed,
        }

    # -- per step, after the runner laid out the batch (positions on the device)
    def fill(self, num_scheduled_tokens: np.ndarray) -> None:
        runner = self.runner
        num_reqs = runner.input_batch.num_reqs
        per_req = np.empty(num_reqs, dtype=np.int64)
        for i, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
            key = request_set(runner.requests[req_id])
            slot = self.slot_of.get(key) if key is not None else None
            if slot is None:
                raise RuntimeError(
                    f"request {req_id} names LongRoPE set {key!r}, which this worker does not hold"
                    f" (held: {sorted(self.slot_of)}); the front end must assign a loaded set"
                )
            per_req[i] = slot
        per_token = torch.from_numpy(np.repeat(per_req, num_scheduled_tokens))
        total = per_token.shape[0]
        slots = self.token_slots[:total]
        slots.copy_(per_token, non_blocking=True)
        positions = runner.positions[:total]
        for rotary in self.rotaries:
            rotary.fill(positions, slots)
        if self.retiring:
            self._drop_retired()

    # -- speculative decoding (ngram): drafts proposed after this step's sampling, for the next step
    def bound_drafts(self, drafts: list[list[int]], num_tokens: np.ndarray) -> None:
        """Trim each request's drafts so that no token is fed at a position at or past its set's window.

        A draft ``d_j`` is fed at position ``num_tokens + j``; the phase of a request that outgrows its window
        ends exactly there (``max_tokens``), so such drafts could only produce discarded tokens, but they would
        be computed with the old set's angles. Trimming them keeps every computed position inside its set."""
        req_ids = self.runner.input_batch.req_ids
        for i, draft in enumerate(drafts):
            if not draft:
                continue
            window = self.window_of.get(request_set(self.runner.requests[req_ids[i]]) or "")
            if window is not None:
                room = max(0, window - int(num_tokens[i]))
                self.drafts_trimmed += max(0, len(draft) - room)
                del draft[room:]


class LongRopeWorkerExtension:
    """Methods vLLM mixes into its Worker class; called through ``collective_rpc`` between steps.

    A failure is returned, not raised: vLLM would flatten the exception into a bare string, and the front end
    must name the cause and undo the load on the other ranks."""

    def _longrope(self) -> LongRopeState:
        state = getattr(self.model_runner, "longrope_state", None)  # type: ignore[attr-defined]
        if state is None:
            raise RuntimeError("per-request LongRoPE is not active in this engine")
        return state

    def longrope_load_set(self, data: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"ok": True, **self._longrope().load(parse_factor_set(data, monotone="ignore"))}
        except Exception as err:  # any failure: report it with its type, the state is unchanged
            logger.error("LongRoPE: cannot load set %s: %s", data.get("name"), traceback.format_exc())
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}

    def longrope_release_set(self, key: str) -> None:
        self._longrope().release(key)

    def longrope_status(self) -> dict[str, Any]:
        return self._longrope().status()
