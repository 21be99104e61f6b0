"""Text that exists on every machine: the Python standard library's source, split three ways.

Files are assigned to a split by a CRC32 of their relative path, so the split does not depend on
the order the file system lists them in, and a file is always in the same split:

- ``train``: what the tiny short model is trained on (~80 % of files)
- ``search``: what factor searches measure perplexity on (~10 %)
- ``heldout``: what the searched sets are checked on afterwards ("text it was not searched on")
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

SPLITS = ("train", "search", "heldout")
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "dist-packages"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """The split a file belongs to (stable across machines for the same relative path)."""
    bucket = zlib.crc32(relpath.encode("utf-8")) % 10
    return "search" if bucket == 0 else "heldout" if bucket == 1 else "train"


def stdlib_files(split: str, root: Path | None = None) -> list[Path]:
    """The ``*.py`` files of one split, sorted by relative path."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    base = root or stdlib_dir()
    out = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        if split_of(rel.as_posix()) == split:
            out.append(path)
    return out


def stdlib_text(split: str, max_chars: int | None = None, root: Path | None = None) -> str:
    """The split's files concatenated (each preceded by a ``# file: NAME`` line), up to max_chars."""
    parts: list[str] = []
    total = 0
    base = root or stdlib_dir()
    for path in stdlib_files(split, base):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunk = f"# file: {path.relative_to(base).as_posix()}\n{text}\n"
        parts.append(chunk)
        total += len(chunk)
        if max_chars is not None and total >= max_chars:
            break
    text = "".join(parts)
    return text if max_chars is None else text[:max_chars]


def text_source(spec: str, max_chars: int | None = None) -> str:
    """Text from ``stdlib:SPLIT`` or a file path (UTF-8)."""
    if spec.startswith("stdlib:"):
        return stdlib_text(spec.split(":", 1)[1], max_chars)
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(
            f"text file {path} does not exist (give a UTF-8 file, or stdlib:search / stdlib:heldout)"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"text file {path} is not UTF-8") from None
    return text if max_chars is None else text[:max_chars]
