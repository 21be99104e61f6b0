"""A worker extension whose load fails for sets named ``fail-*``: a worker-side failure injected into a real
engine (the error is raised inside the engine's worker process, as a real one would be)."""

from __future__ import annotations

from typing import Any

from server.vllm_ext.worker import LongRopeWorkerExtension

FAIL_PREFIX = "fail-"
FAULT = "RuntimeError: injected worker fault: device lost while writing the set"


class FailingLoadExtension(LongRopeWorkerExtension):
    def longrope_load_set(self, data: dict[str, Any]) -> dict[str, Any]:
        if str(data.get("name", "")).startswith(FAIL_PREFIX):
            state = self._longrope()
            original = state.load

            def failing_load(fs: Any) -> dict[str, Any]:
                raise RuntimeError("injected worker fault: device lost while writing the set")

            state.load = failing_load  # type: ignore[method-assign]
            try:
                return super().longrope_load_set(data)
            finally:
                state.load = original  # type: ignore[method-assign]
        return super().longrope_load_set(data)


QUALNAME = f"{__name__}.FailingLoadExtension"
