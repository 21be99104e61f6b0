"""The few numbers of a model's RoPE that a factor set depends on (no torch: clients and the file formats
import it)."""

from __future__ import annotations

from dataclasses import dataclass

from factors.schema import ModelFingerprint


def slot_bytes(rotary_dim: int) -> int:
    """What one set version costs the server, whatever its window: its scaled and original inverse
    frequencies (float64, rotary_dim/2 each), n̂ and mscale — one slot of ``factors.rope.StepRope``."""
    return (rotary_dim + 2) * 8


@dataclass(frozen=True)
class RopeGeometry:
    """The few numbers of a model's RoPE that a factor set depends on."""

    rope_theta: float
    rotary_dim: int
    original_max_len: int
    model: ModelFingerprint | None = None
