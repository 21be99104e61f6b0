"""Text that exists on every machine, of several kinds, each split three ways.

Kinds (``KIND:SPLIT`` in ``text_source``):

- ``stdlib``: the Python standard library's source (code); a unit is a file;
- ``pydoc``: the English reference prose shipped in the stdlib (``pydoc_data.topics``: what ``help()``
  shows about statements, operators and types); a unit is a topic;
- ``licenses``: English legal prose, the license texts of ``/usr/share/common-licenses`` (Debian's
  base-files: GPL, LGPL, Apache, MPL, GFDL, ...); a unit is a paragraph (there are few files);
- ``copyright``: the ``/usr/share/doc/*/copyright`` files of the installed packages, paragraphs
  deduplicated (legal prose and file lists; which packages are installed varies by machine).

A unit goes to a split by a CRC32 of its name (a file's relative path, a topic's name, a paragraph's
text), so the split does not depend on the order the file system lists things in:

- ``train``: what the tiny models are trained on (~80 %)
- ``search``: what factor searches measure perplexity on (~10 %)
- ``heldout``: what the searched sets are checked on afterwards ("text it was not searched on")

The retrieval fixture is trained on ``stdlib`` and ``pydoc`` and never on ``licenses`` or
``copyright``: those are the "kind of text it never trained on".
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Callable
from pathlib import Path

SPLITS = ("train", "search", "heldout")
KINDS = ("stdlib", "pydoc", "licenses", "copyright")
LICENSES_DIR = Path("/usr/share/common-licenses")
DOC_DIR = Path("/usr/share/doc")
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


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _take(chunks: list[str], max_chars: int | None) -> str:
    """The chunks joined, stopping once max_chars are in (cut to exactly max_chars)."""
    parts: list[str] = []
    total = 0
    for chunk in chunks:
        parts.append(chunk)
        total += len(chunk)
        if max_chars is not None and total >= max_chars:
            break
    text = "".join(parts)
    return text if max_chars is None else text[:max_chars]


def pydoc_text(split: str, max_chars: int | None = None) -> str:
    """The split's topics of ``pydoc_data.topics`` (sorted by name, each after a blank line)."""
    from pydoc_data.topics import topics

    _check_split(split)
    chunks = [f"{topics[name].strip()}\n\n" for name in sorted(topics) if split_of(f"pydoc/{name}") == split]
    return _take(chunks, max_chars)


def _paragraphs(files: list[Path], read: Callable[[Path], str]) -> list[str]:
    """Blank-line separated paragraphs of the files in order, each kept once (first occurrence)."""
    seen: set[str] = set()
    out: list[str] = []
    for path in files:
        try:
            text = read(path)
        except (UnicodeDecodeError, OSError):
            continue
        for para in text.replace("\r\n", "\n").split("\n\n"):
            para = para.strip("\n")
            if para.strip() and para not in seen:
                seen.add(para)
                out.append(para + "\n\n")
    return out


def _paragraph_text(files: list[Path], split: str, max_chars: int | None, what: str) -> str:
    _check_split(split)
    if not files:
        raise ValueError(f"no {what} on this machine (a Debian system has them); use stdlib:SPLIT or pydoc:SPLIT")
    paras = _paragraphs(files, lambda p: p.read_text(encoding="utf-8"))
    return _take([p for p in paras if split_of(p) == split], max_chars)


def licenses_text(split: str, max_chars: int | None = None, root: Path = LICENSES_DIR) -> str:
    """The split's paragraphs of the license texts in ``root`` (links to the same file read once)."""
    files = sorted({p.resolve() for p in root.glob("*") if p.is_file()}) if root.is_dir() else []
    return _paragraph_text(files, split, max_chars, f"license texts in {root}")


def copyright_text(split: str, max_chars: int | None = None, root: Path = DOC_DIR) -> str:
    """The split's paragraphs of the installed packages' copyright files (deduplicated)."""
    files = sorted({p.resolve() for p in root.glob("*/copyright") if p.is_file()}) if root.is_dir() else []
    return _paragraph_text(files, split, max_chars, f"copyright files in {root}/*/")


_KIND_TEXT: dict[str, Callable[[str, int | None], str]] = {
    "stdlib": lambda split, n: stdlib_text(split, n),
    "pydoc": pydoc_text,
    "licenses": lambda split, n: licenses_text(split, n),
    "copyright": lambda split, n: copyright_text(split, n),
}


def text_parts(spec: str) -> tuple[str, ...]:
    """The texts a spec joins with ``+`` (a file whose own name holds ``+`` is one text)."""
    if "+" in spec and not Path(spec).exists():
        return tuple(spec.split("+"))
    return (spec,)


def text_source(spec: str, max_chars: int | None = None) -> str:
    """Text from ``KIND:SPLIT`` (see the module doc), a UTF-8 file path, or several joined by ``+``
    (``stdlib:search+pydoc:search``: each part gets an equal share of max_chars, concatenated)."""
    parts = text_parts(spec)
    if len(parts) > 1:
        share = None if max_chars is None else max_chars // len(parts)
        return "".join(text_source(part, share) for part in parts)
    kind, sep, split = spec.partition(":")
    if sep and kind in _KIND_TEXT:
        return _KIND_TEXT[kind](split, max_chars)
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(
            f"text file {path} does not exist (give a UTF-8 file, or KIND:SPLIT with KIND one of "
            f"{', '.join(KINDS)} and SPLIT one of {', '.join(SPLITS)}, e.g. stdlib:search)"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"text file {path} is not UTF-8") from None
    return text if max_chars is None else text[:max_chars]
