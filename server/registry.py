"""The factor-set registry: every version of every set on disk, and which version of each name is live.

Layout (all writes atomic: temp file + fsync + rename + fsync of the folder)::

    REGISTRY/sets/NAME/VERSION.json   one immutable file per version (FactorSet JSON with its version)
    REGISTRY/live.json                {"live": {"NAME": VERSION, ...}, "retired": ["NAME", ...],
                                       "explicit": ["NAME", ...]}

``explicit`` lists the live names automatic routing never picks (only requests naming them get them); a
name not listed is ``auto``. A ``live.json`` written before routing existed has no ``explicit``: all auto.

A crash between the two writes leaves an extra version file that ``live.json`` does not point at, which
is harmless: the registry restores exactly the last ``live.json`` that was completely written. A crash
inside a write leaves at most a ``.NAME.*.tmp`` file, which readers never look at and the next start
removes (tests/reliability/test_registry_crash.py kills a writer at every step to prove it).

Damage from outside (a truncated or edited file) is never fatal: a live version whose file does not load
is skipped with an ERROR naming the file, and an unreadable ``live.json`` is kept aside as
``live.json.corrupt-TIMESTAMP`` before the registry starts over from the start-up sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from factors.formats import atomic_write_text, factor_set_json, load_json_set
from factors.schema import NAME_PATTERN, FactorSet, FactorSetError

logger = logging.getLogger("longrope.registry")

LIVE_FILE = "live.json"
LOCK_FILE = ".lock"


@dataclass
class RegistryState:
    live: dict[str, int] = field(default_factory=dict)
    retired: list[str] = field(default_factory=list)
    explicit: list[str] = field(default_factory=list)  # live names with routing "explicit"


class Registry:
    """Versions on disk plus the live pointer; the engine's table is rebuilt from it at start."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.sets_dir = self.root / "sets"
        self.sets_dir.mkdir(parents=True, exist_ok=True)

    # -- reading
    def read_state(self) -> RegistryState:
        """The live pointer; an empty one (logged) when ``live.json`` is damaged — the engine then writes
        its in-memory table over it, which is the truth while it runs."""
        try:
            return self.read_state_strict()
        except FactorSetError as err:
            logger.error("REGISTRY: %s; it will be rewritten from the live table", err)
            return RegistryState()

    def read_state_strict(self) -> RegistryState:
        """The live pointer; raises :class:`FactorSetError` when ``live.json`` exists but is damaged."""
        path = self.root / LIVE_FILE
        if not path.exists():
            return RegistryState()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            live = {str(k): int(v) for k, v in data.get("live", {}).items()}
            retired = [str(n) for n in data.get("retired", [])]
            explicit = [str(n) for n in data.get("explicit", [])]
        except (ValueError, TypeError, AttributeError, RecursionError, OSError) as err:
            raise FactorSetError(f"registry pointer {path} is unreadable ({err})") from None
        bad = [f"{n}@{v}" for n, v in live.items() if not re.match(NAME_PATTERN, n) or v < 1]
        bad += [n for n in retired + explicit if not re.match(NAME_PATTERN, n)]
        if bad:
            raise FactorSetError(f"registry pointer {path} names invalid sets or versions: {bad}")
        return RegistryState(live, retired, explicit)

    def _state_or_fresh(self) -> RegistryState:
        """The live pointer at start; a damaged one is kept aside (never overwritten) and logged loudly."""
        try:
            return self.read_state_strict()
        except FactorSetError as err:
            path = self.root / LIVE_FILE
            kept = path.with_name(f"{LIVE_FILE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            path.replace(kept)
            logger.error("REGISTRY: %s; kept it as %s and starting from the start-up sets only", err, kept)
            return RegistryState()

    def remove_stale_temp_files(self) -> list[Path]:
        """Temp files of writes that were interrupted (crash, kill -9); never read, removed at start."""
        stale = [p for p in self.root.rglob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            logger.warning("REGISTRY: removed %d temp file(s) of interrupted writes: %s", len(stale), stale)
        return stale

    def version_path(self, name: str, version: int) -> Path:
        return self.sets_dir / name / f"{version}.json"

    def versions(self, name: str) -> list[int]:
        folder = self.sets_dir / name
        if not folder.is_dir():
            return []
        return sorted(int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit())

    def load_version(self, name: str, version: int) -> FactorSet:
        fs = load_json_set(self.version_path(name, version), monotone="ignore")
        if fs.name != name or fs.version != version:
            raise FactorSetError(
                f"registry file {self.version_path(name, version)} holds {fs.label}, not {name}@{version}"
            )
        return fs

    def latest_version(self, name: str) -> int:
        return max(self.versions(name), default=0)

    def restore(self, startup: list[FactorSet]) -> list[FactorSet]:
        """The live sets: the registry's for the names it knows, start-up sets for new names (saved as
        their version). A live version whose file is corrupt is skipped with a loud log."""
        self.remove_stale_temp_files()
        state = self._state_or_fresh()
        out: dict[str, FactorSet] = {}
        for name, version in state.live.items():
            try:
                out[name] = self.load_version(name, version)
            except FactorSetError as err:
                logger.error(
                    "REGISTRY: skipping %s@%d, its file %s does not load: %s",
                    name,
                    version,
                    self.version_path(name, version),
                    err,
                )
        for fs in startup:
            if fs.name in out or fs.name in state.retired or fs.name in state.live:
                known = out.get(fs.name)
                if known is not None and known.factors != fs.factors:
                    logger.warning(
                        "REGISTRY: the start-up set %r differs from the registry's live %s; the registry wins"
                        " (load the file through POST /admin/factors to make it live)",
                        fs.name,
                        known.label,
                    )
                continue
            version = fs.version or 1
            if self.version_path(fs.name, version).exists():
                try:
                    fs = self.load_version(fs.name, version)
                except FactorSetError as err:
                    logger.error("REGISTRY: %s; using the start-up file instead", err)
                    fs = fs.with_updates(version=self.latest_version(fs.name) + 1)
                    self.save_version(fs)
            else:
                fs = fs.with_updates(version=version)
                self.save_version(fs)
            out[fs.name] = fs
        explicit = [n for n in state.explicit if n in out]
        if out and set(explicit) >= set(out):
            raise FactorSetError(
                f"the registry {self.root} leaves no set for automatic routing: every live set ({', '.join(out)})"
                f" is explicit; remove one name from 'explicit' in {self.root / LIVE_FILE}, or start with"
                " --factors naming a new set"
            )
        self.write_state(
            RegistryState(
                {n: fs.version or 1 for n, fs in out.items()}, [r for r in state.retired if r not in out], explicit
            )
        )
        return list(out.values())

    # -- writing
    @contextlib.asynccontextmanager
    async def exclusive(self, timeout: float = 30.0) -> AsyncIterator[None]:
        """Hold the registry's lock file (``flock``) while picking a version number and writing, so servers
        sharing the folder never write the same version twice or undo each other's ``live.json`` change.
        Polls without blocking the event loop."""
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise FactorSetError(
                            f"the registry {self.root} stayed locked for {timeout:.0f} s (another server writing?);"
                            " try again"
                        ) from None
                    await asyncio.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def save_version(self, fs: FactorSet) -> Path:
        """Write a new version file; an existing version is never overwritten (versions are immutable)."""
        if fs.version is None:
            raise ValueError("only versioned sets go into the registry")
        path = self.version_path(fs.name, fs.version)
        if path.exists():
            raise FactorSetError(f"{fs.label} already exists in the registry {self.root}; versions are immutable")
        atomic_write_text(path, factor_set_json(fs))
        return path

    def write_state(self, state: RegistryState) -> None:
        body = {
            "live": dict(sorted(state.live.items())),
            "retired": sorted(set(state.retired)),
            "explicit": sorted({n for n in state.explicit if n in state.live}),
        }
        text = json.dumps(body, indent=2) + "\n"
        atomic_write_text(self.root / LIVE_FILE, text)
