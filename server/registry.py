"""The factor-set registry: every version of every set on disk, and which version of each name is live.

Layout (all writes atomic: temp file + fsync + rename + fsync of the folder)::

    REGISTRY/sets/NAME/VERSION.json   one immutable file per version (FactorSet JSON with its version)
    REGISTRY/live.json                {"live": {"NAME": VERSION, ...}, "retired": ["NAME", ...]}

A crash between the two writes leaves an extra version file that ``live.json`` does not point at, which
is harmless: the registry restores exactly the last ``live.json`` that was completely written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from factors.formats import atomic_write_text, factor_set_json, load_json_set
from factors.schema import FactorSet, FactorSetError

logger = logging.getLogger("longrope.registry")

LIVE_FILE = "live.json"


@dataclass
class RegistryState:
    live: dict[str, int] = field(default_factory=dict)
    retired: list[str] = field(default_factory=list)


class Registry:
    """Versions on disk plus the live pointer; the engine's table is rebuilt from it at start."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.sets_dir = self.root / "sets"
        self.sets_dir.mkdir(parents=True, exist_ok=True)

    # -- reading
    def read_state(self) -> RegistryState:
        path = self.root / LIVE_FILE
        if not path.exists():
            return RegistryState()
        try:
            data = json.loads(path.read_text())
            return RegistryState(
                {str(k): int(v) for k, v in data.get("live", {}).items()}, list(data.get("retired", []))
            )
        except (ValueError, TypeError, AttributeError) as err:
            logger.error("REGISTRY: %s is unreadable (%s); starting from the start-up sets only", path, err)
            return RegistryState()

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
        state = self.read_state()
        out: dict[str, FactorSet] = {}
        for name, version in state.live.items():
            try:
                out[name] = self.load_version(name, version)
            except FactorSetError as err:
                logger.error("REGISTRY: skipping %s@%d: %s", name, version, err)
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
        self.write_state(
            RegistryState({n: fs.version or 1 for n, fs in out.items()}, [r for r in state.retired if r not in out])
        )
        return list(out.values())

    # -- writing
    def save_version(self, fs: FactorSet) -> Path:
        if fs.version is None:
            raise ValueError("only versioned sets go into the registry")
        path = self.version_path(fs.name, fs.version)
        atomic_write_text(path, factor_set_json(fs))
        return path

    def write_state(self, state: RegistryState) -> None:
        text = (
            json.dumps({"live": dict(sorted(state.live.items())), "retired": sorted(set(state.retired))}, indent=2)
            + "\n"
        )
        atomic_write_text(self.root / LIVE_FILE, text)
