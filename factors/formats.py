"""Factor-set files: the project's JSON, LongRoPE's CSV, and Hugging Face ``longrope`` configs.

- JSON: one FactorSet object (``schema_version`` 1), written atomically.
- CSV: the LongRoPE repository's files of λ_i, comma separated; a file may repeat the same row
  (one per layer); a single column is accepted too.
- HF: a config's ``rope_scaling`` / ``rope_parameters`` block of type ``longrope`` (``su`` in old
  Phi-3 configs) ↔ a short set (window = original) and a long set (window =
  ``max_position_embeddings``). As in transformers, one ``attention_factor`` serves both unless the
  block has Phi-3-small's ``short_mscale`` / ``long_mscale``.

Length (≈390 lines): three formats in both directions; each reader sits next to its writer so a round trip
is checked in one place.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factors.geometry import RopeGeometry
from factors.schema import FactorSet, FactorSetError, ModelFingerprint, MonotonePolicy, parse_factor_set

MAX_FILE_BYTES = 8 * 1024 * 1024
# A model folder's own factor sets (written by ``longrope-factors finetune`` / ``extend``; the server loads them
# with the model).
MODEL_SETS_DIR = "longrope-sets"


# -- model configs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRope:
    """The RoPE facts of a model, read from its config.json without importing transformers."""

    geometry: RopeGeometry
    max_position_embeddings: int
    rope_type: str
    rope_block: dict[str, Any] | None
    head_dim: int

    @property
    def fingerprint(self) -> ModelFingerprint:
        assert self.geometry.model is not None
        return self.geometry.model


def _rope_block(cfg: dict[str, Any]) -> dict[str, Any] | None:
    block = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    return dict(block) if isinstance(block, dict) else None


def model_rope_from_config(cfg: dict[str, Any]) -> ModelRope:
    """Read rotary_dim, rope_theta, windows and the rope block from a config dict."""
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):
        cfg = cfg["text_config"]
    block = _rope_block(cfg) or {}
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as err:
        raise FactorSetError(f"model config: missing or bad hidden_size/num_attention_heads ({err})") from None
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    partial = float(block.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * partial)
    theta = block.get("rope_theta", cfg.get("rope_theta", 10000.0))
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    original = block.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    rope_type = str(block.get("rope_type") or block.get("type") or "default")
    fingerprint = ModelFingerprint(
        model_type=cfg.get("model_type"),
        hidden_size=hidden,
        num_hidden_layers=cfg.get("num_hidden_layers"),
        num_attention_heads=heads,
        head_dim=head_dim,
        vocab_size=cfg.get("vocab_size"),
    )
    geo = RopeGeometry(float(theta), rotary_dim, int(original or max_pos), fingerprint)
    return ModelRope(geo, max_pos, rope_type, block or None, head_dim)


def read_model_rope(model_dir: str | os.PathLike[str]) -> ModelRope:
    """ModelRope of a Hugging Face model folder (its config.json)."""
    path = Path(model_dir) / "config.json"
    return model_rope_from_config(_read_json(path, "model config"))


def check_compatible(fs: FactorSet, model: ModelRope) -> None:
    """Raise FactorSetError listing every way the set does not fit the model."""
    geo = model.geometry
    problems = []
    if fs.rotary_dim != geo.rotary_dim:
        problems.append(f"rotary_dim: the set has {fs.rotary_dim}, the model rotates {geo.rotary_dim} dims")
    if not math.isclose(fs.rope_theta, geo.rope_theta, rel_tol=1e-9):
        problems.append(f"rope_theta: the set has {fs.rope_theta:g}, the model's base is {geo.rope_theta:g}")
    if fs.original_max_len != geo.original_max_len:
        problems.append(
            f"original_max_len: the set has {fs.original_max_len}, the model was pretrained on {geo.original_max_len}"
        )
    if fs.model is not None:
        problems.extend(fs.model.mismatches(model.fingerprint))
    if problems:
        raise FactorSetError(f"factor set {fs.name!r} does not fit this model: " + "; ".join(problems))


# -- JSON ----------------------------------------------------------------------------------------


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise FactorSetError(f"{what} {path}: {size} bytes is larger than the {MAX_FILE_BYTES} byte limit")
        return path.read_bytes()
    except FactorSetError:
        raise
    except OSError as err:
        raise FactorSetError(f"cannot read {what} {path}: {err.strerror or err}") from None


def _read_json(path: Path, what: str) -> Any:
    raw = _read_bytes(path, what)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FactorSetError(f"{what} {path} is not valid JSON: {err}") from None


def load_json_set(path: str | os.PathLike[str], *, monotone: MonotonePolicy = "warn") -> FactorSet:
    """Read one factor set from a JSON file."""
    p = Path(path)
    return parse_factor_set(_read_json(p, "factor file"), monotone=monotone, what=f"factor file {p}")


def factor_set_json(fs: FactorSet) -> str:
    """The canonical JSON text of a set (explicit mscale, ISO dates)."""
    return fs.model_dump_json(indent=2, exclude_none=True) + "\n"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write temp file + fsync + rename + fsync(dir): readers see the old file or the new, never half. The
    file gets the permissions of any new file (0666 less the umask), not mkstemp's private 0600."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_json_set(fs: FactorSet, path: str | os.PathLike[str]) -> None:
    atomic_write_text(path, factor_set_json(fs))


# -- LongRoPE CSV ------------------------------------------------------------------------------


def parse_longrope_csv(text: str, source: str = "CSV") -> list[float]:
    """λ_i from LongRoPE's CSV: one row of factors (repeated rows must be identical) or one column."""
    rows = [[cell.strip() for cell in row if cell.strip()] for row in csv.reader(io.StringIO(text))]
    rows = [r for r in rows if r]
    if not rows:
        raise FactorSetError(f"{source}: no factors found (expected comma-separated numbers)")
    if all(len(r) == 1 for r in rows) and len(rows) > 1:
        rows = [[r[0] for r in rows]]  # a single column
    try:
        parsed = [[float(c) for c in r] for r in rows]
    except ValueError as err:
        raise FactorSetError(f"{source}: every cell must be a number ({err})") from None
    first = parsed[0]
    for n, row in enumerate(parsed[1:], start=2):
        if row != first:
            raise FactorSetError(
                f"{source}: row {n} differs from row 1; per-layer factors are not supported"
                " (expected one row, or identical rows)"
            )
    return first


def load_csv_set(
    path: str | os.PathLike[str],
    *,
    name: str,
    geometry: RopeGeometry,
    max_len: int,
    n_hat: int = 0,
    mscale: float | None = None,
    monotone: MonotonePolicy = "warn",
) -> FactorSet:
    """A factor set from a LongRoPE CSV plus the fields a CSV does not carry."""
    p = Path(path)
    try:
        text = _read_bytes(p, "CSV file").decode("utf-8")
    except UnicodeDecodeError:
        raise FactorSetError(f"CSV file {p} is not UTF-8 text") from None
    return csv_factor_set(
        text,
        name=name,
        geometry=geometry,
        max_len=max_len,
        n_hat=n_hat,
        mscale=mscale,
        monotone=monotone,
        source=str(p),
    )


def csv_factor_set(
    text: str,
    *,
    name: str,
    geometry: RopeGeometry,
    max_len: int,
    n_hat: int = 0,
    mscale: float | None = None,
    monotone: MonotonePolicy = "warn",
    source: str = "CSV",
) -> FactorSet:
    data = {
        "name": name,
        "factors": parse_longrope_csv(text, source),
        "rope_theta": geometry.rope_theta,
        "rotary_dim": geometry.rotary_dim,
        "original_max_len": geometry.original_max_len,
        "max_len": max_len,
        "n_hat": n_hat,
        "mscale": mscale,
        "provenance": {"method": "csv", "source": source},
    }
    if geometry.model is not None:
        data["model"] = geometry.model.model_dump()
    return parse_factor_set(data, monotone=monotone, what=f"factor set from {source}")


def longrope_csv(fs: FactorSet) -> str:
    """One row of λ_i, as LongRoPE writes it."""
    return ",".join(repr(float(x)) for x in fs.factors) + "\n"


# -- Hugging Face longrope ----------------------------------------------------------------------


LONGROPE_TYPES = ("longrope", "su")


def sets_from_hf_config(
    cfg: dict[str, Any],
    *,
    short_name: str = "short",
    long_name: str = "long",
    monotone: MonotonePolicy = "warn",
    source: str | None = None,
) -> tuple[FactorSet, FactorSet]:
    """Short and long sets from a config with a ``longrope`` block (config.json, or the block
    itself plus ``max_position_embeddings`` etc. at top level)."""
    if "short_factor" in cfg and "rope_parameters" not in cfg and "rope_scaling" not in cfg:
        raise FactorSetError(
            'HF config: got a bare longrope block; wrap it as {"rope_parameters": {...},'
            ' "max_position_embeddings": N, "hidden_size": H, "num_attention_heads": A}'
            " or pass the model's whole config.json"
        )
    model = model_rope_from_config(cfg)
    block = model.rope_block or {}
    if model.rope_type not in LONGROPE_TYPES:
        raise FactorSetError(
            f"HF config: rope type is {model.rope_type!r}; expected 'longrope' with short_factor and long_factor"
        )
    for key in ("short_factor", "long_factor"):
        if not isinstance(block.get(key), list):
            raise FactorSetError(f"HF config: rope block field {key} is missing or not a list of numbers")
    original = model.geometry.original_max_len
    max_pos = model.max_position_embeddings
    factor = block.get("factor") or max_pos / original
    shared = block.get("attention_factor")
    if shared is None:
        shared = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short_mscale = block.get("short_mscale", shared)
    long_mscale = block.get("long_mscale", shared)
    common = {
        "rope_theta": model.geometry.rope_theta,
        "rotary_dim": model.geometry.rotary_dim,
        "original_max_len": original,
        "model": model.fingerprint.model_dump(),
        "provenance": {"method": "hf-config", "source": source},
    }
    short = parse_factor_set(
        {**common, "name": short_name, "factors": block["short_factor"], "max_len": original, "mscale": short_mscale},
        monotone=monotone,
        what="HF config short_factor",
    )
    long = parse_factor_set(
        {**common, "name": long_name, "factors": block["long_factor"], "max_len": max_pos, "mscale": long_mscale},
        monotone=monotone,
        what="HF config long_factor",
    )
    return short, long


def hf_config_from_sets(short: FactorSet, long: FactorSet, key: str = "rope_parameters") -> dict[str, Any]:
    """The config fragment transformers/vLLM read for a LongRoPE model: the ``longrope`` block plus
    ``max_position_embeddings``. Sets with n_hat > 0 cannot be expressed (HF has no n̂)."""
    for fs in (short, long):
        if fs.n_hat:
            raise FactorSetError(f"set {fs.name!r} has n_hat={fs.n_hat}; Hugging Face's longrope has no n̂")
    for field in ("rotary_dim", "rope_theta", "original_max_len"):
        if getattr(short, field) != getattr(long, field):
            raise FactorSetError(
                f"short and long sets disagree on {field}: {getattr(short, field)} vs {getattr(long, field)}"
            )
    if short.max_len > short.original_max_len:
        raise FactorSetError(
            f"the short set's window ({short.max_len}) must not exceed original_max_len ({short.original_max_len}):"
            " HF uses the short factors only up to the original length"
        )
    block: dict[str, Any] = {
        "rope_type": "longrope",
        "rope_theta": long.rope_theta,
        "short_factor": list(short.factors),
        "long_factor": list(long.factors),
        "original_max_position_embeddings": long.original_max_len,
    }
    if math.isclose(short.resolved_mscale, long.resolved_mscale, rel_tol=1e-12):
        block["attention_factor"] = long.resolved_mscale
    else:
        block["short_mscale"] = short.resolved_mscale
        block["long_mscale"] = long.resolved_mscale
    return {"max_position_embeddings": long.max_len, key: block}


def expand_set_paths(paths: Any) -> list[Path]:
    """Files as given; folders contribute their *.json files (sorted)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(q for q in p.glob("*.json") if q.is_file()))
        elif p.exists():
            out.append(p)
        else:
            raise FactorSetError(f"factor file or folder {p} does not exist")
    return out


def model_set_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The factor-set files a model folder carries in MODEL_SETS_DIR (none when it has no such folder)."""
    folder = Path(model_dir) / MODEL_SETS_DIR
    return expand_set_paths([folder]) if folder.is_dir() else []


def load_set_paths(paths: Any, *, monotone: MonotonePolicy = "warn") -> list[FactorSet]:
    """Every set in the given files and folders (JSON sets and HF configs)."""
    return [fs for path in expand_set_paths(paths) for fs in load_any(path, monotone=monotone)]


def load_any(
    path: str | os.PathLike[str],
    *,
    monotone: MonotonePolicy = "warn",
    geometry: RopeGeometry | None = None,
    max_len: int | None = None,
    name: str | None = None,
    n_hat: int = 0,
    mscale: float | None = None,
) -> list[FactorSet]:
    """Read a file of any supported format into its sets (JSON set: 1; HF config: 2; CSV: 1,
    which needs the geometry and window the CSV does not carry)."""
    p = Path(path)
    if p.suffix.lower() == ".csv":
        if geometry is None or max_len is None:
            raise FactorSetError(
                f"{p}: a LongRoPE CSV holds only λ_i; give the model (or rope_theta, rotary_dim,"
                " original_max_len) and max_len"
            )
        return [
            load_csv_set(
                p,
                name=name or p.stem,
                geometry=geometry,
                max_len=max_len,
                n_hat=n_hat,
                mscale=mscale,
                monotone=monotone,
            )
        ]
    data = _read_json(p, "factor file")
    if isinstance(data, dict) and ("rope_parameters" in data or "rope_scaling" in data):
        return list(sets_from_hf_config(data, monotone=monotone, source=str(p)))
    return [parse_factor_set(data, monotone=monotone, what=f"factor file {p}")]
