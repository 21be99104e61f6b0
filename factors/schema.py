"""The factor-set schema: one pydantic model for files, HTTP bodies and the engine.

A LongRoPE factor set rescales every RoPE frequency pair ``i`` by its own factor
``λ_i`` (``θ_i' = θ_i / λ_i``), keeps the original angles for the first ``n_hat``
positions, and multiplies cos/sin by ``mscale``. It serves sequences up to
``max_len`` tokens of a model pretrained on ``original_max_len``.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

MonotonePolicy = Literal["warn", "reject", "ignore"]


class FactorSetError(ValueError):
    """A factor set (or its file) is invalid; the message says what and what is expected."""


def default_mscale(max_len: int, original_max_len: int) -> float:
    """LongRoPE's attention scale ``sqrt(1 + ln(s) / ln(L_orig))``, 1.0 when not extended."""
    scale = max_len / original_max_len
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_max_len))


class Provenance(BaseModel):
    """Where a set came from: how it was made, from what, and how good it measured."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field("manual", description="e.g. longrope-search, pi, ntk, yarn, hf-config, csv")
    source: str | None = Field(None, description="file, model or search run the set came from")
    metrics: dict[str, Any] = Field(default_factory=dict, description="e.g. perplexity table")
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    notes: str | None = None


class ModelFingerprint(BaseModel):
    """What identifies the model a set was made for; fields left out are not checked."""

    model_config = ConfigDict(extra="forbid")

    model_type: str | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None

    def mismatches(self, other: ModelFingerprint) -> list[str]:
        """Fields set on both sides that differ, as 'field: set has X, model has Y'."""
        out = []
        for field in type(self).model_fields:
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine is not None and theirs is not None and mine != theirs:
                out.append(f"model.{field}: the set was made for {mine!r}, the model has {theirs!r}")
        return out


class FactorSet(BaseModel):
    """One LongRoPE factor set. Minimal form: name, factors, rope_theta, rotary_dim,
    original_max_len, max_len (n_hat defaults to 0, mscale to LongRoPE's formula)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False, frozen=True)

    schema_version: int = Field(SCHEMA_VERSION, description="file format version")
    name: str = Field(..., pattern=NAME_PATTERN, description="set name, e.g. short-8k")
    version: int | None = Field(None, ge=1, description="assigned by the registry")
    max_len: int = Field(..., ge=1, description="longest sequence (tokens) this set serves")
    original_max_len: int = Field(..., ge=1, description="the model's pretraining window")
    rotary_dim: int = Field(..., ge=2, description="rotated dims per head (head_dim × partial)")
    rope_theta: float = Field(..., gt=0, description="RoPE base")
    factors: list[float] = Field(..., description="λ_i per frequency pair, rotary_dim/2 values")
    n_hat: int = Field(0, ge=0, description="positions < n_hat keep the original angles")
    mscale: float | None = Field(None, description="cos/sin scale; default LongRoPE formula")
    allow_factors_below_one: bool = Field(
        False, description="accept λ_i < 1 (frequencies sped up); off unless asked for"
    )
    model: ModelFingerprint | None = None
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {v}; this longrope-serve reads {SCHEMA_VERSION}")
        return v

    @field_validator("rotary_dim")
    @classmethod
    def _even_rotary_dim(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"must be even (pairs of dims rotate together), got {v}")
        return v

    @field_validator("rope_theta")
    @classmethod
    def _finite_theta(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _check_consistency(self, info: ValidationInfo) -> FactorSet:
        expected = self.rotary_dim // 2
        if len(self.factors) != expected:
            raise ValueError(
                f"factors: expected {expected} values (rotary_dim/2 for rotary_dim={self.rotary_dim}),"
                f" got {len(self.factors)}"
            )
        bad = [(i, f) for i, f in enumerate(self.factors) if not math.isfinite(f)]
        if bad:
            i, f = bad[0]
            raise ValueError(f"factors: every λ_i must be finite; factors[{i}] is {f} ({len(bad)} bad)")
        low = [(i, f) for i, f in enumerate(self.factors) if f <= 0 or (f < 1 and not self.allow_factors_below_one)]
        if low:
            i, f = low[0]
            if f <= 0:
                raise ValueError(f"factors: every λ_i must be > 0; factors[{i}] is {f}")
            raise ValueError(
                f"factors: every λ_i must be ≥ 1 (interpolation); factors[{i}] is {f}."
                " Set allow_factors_below_one: true if this is intended"
            )
        if self.n_hat >= self.max_len:
            raise ValueError(f"n_hat: must be < max_len ({self.max_len}), got {self.n_hat}")
        if self.mscale is None:
            object.__setattr__(self, "mscale", default_mscale(self.max_len, self.original_max_len))
        elif not (math.isfinite(self.mscale) and self.mscale > 0):
            raise ValueError(f"mscale: must be a finite number > 0, got {self.mscale}")
        policy: MonotonePolicy = (info.context or {}).get("monotone", "warn") if info else "warn"
        problem = self.monotonicity_problem()
        if problem:
            if policy == "reject":
                raise ValueError(problem)
            if policy == "warn":
                logger.warning("factor set %r: %s", self.name, problem)
        return self

    def monotonicity_problem(self) -> str | None:
        """LongRoPE's λ_i grow with the frequency index; say where they don't."""
        for i in range(1, len(self.factors)):
            if self.factors[i] < self.factors[i - 1]:
                return (
                    f"factors: λ_i should be non-decreasing across the frequency index;"
                    f" factors[{i}]={self.factors[i]} < factors[{i - 1}]={self.factors[i - 1]}"
                )
        return None

    # -- derived values -------------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """Extension ratio s = max_len / original_max_len."""
        return self.max_len / self.original_max_len

    @property
    def resolved_mscale(self) -> float:
        assert self.mscale is not None  # filled by the validator
        return self.mscale

    @property
    def label(self) -> str:
        """NAME@VERSION as the server reports it (NAME when unversioned)."""
        return f"{self.name}@{self.version}" if self.version is not None else self.name

    def summary(self) -> dict[str, Any]:
        """What a person wants to see of a set: window, λ range, n̂, mscale, provenance (JSON-ready)."""
        lam = self.factors
        return {
            "name": self.name,
            "version": self.version,
            "label": self.label,
            "max_len": self.max_len,
            "original_max_len": self.original_max_len,
            "scale": round(self.scale, 6),
            "rotary_dim": self.rotary_dim,
            "rope_theta": self.rope_theta,
            "n_hat": self.n_hat,
            "mscale": self.resolved_mscale,
            "factors": {"count": len(lam), "min": min(lam), "max": max(lam), "first": lam[0], "last": lam[-1]},
            "monotone": self.monotonicity_problem() is None,
            "provenance": self.provenance.model_dump(mode="json"),
        }

    def with_updates(self, **changes: Any) -> FactorSet:
        """A validated copy with some fields changed."""
        data = self.model_dump()
        data.update(changes)
        return FactorSet.model_validate(data, context={"monotone": "ignore"})


def explain_validation_error(err: ValidationError, what: str = "factor set") -> str:
    """Turn pydantic's error list into one message naming each field and what it expects."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not part of the factor-set schema)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "string_pattern_mismatch" and loc == "name":
            msg = f"must be 1-64 characters of letters, digits, '.', '_', '-', got {e.get('input')!r}"
        prefix = f"{loc}: " if loc and not msg.startswith(f"{loc}:") else ""
        lines.append(f"{prefix}{msg}")
    return f"invalid {what}: " + "; ".join(lines)


def parse_factor_set(data: Any, *, monotone: MonotonePolicy = "warn", what: str = "factor set") -> FactorSet:
    """Validate a decoded JSON object into a FactorSet, raising FactorSetError with a clear message."""
    if not isinstance(data, dict):
        raise FactorSetError(f"invalid {what}: expected a JSON object, got {type(data).__name__}")
    try:
        return FactorSet.model_validate(data, context={"monotone": monotone})
    except ValidationError as err:
        raise FactorSetError(explain_validation_error(err, what)) from None
