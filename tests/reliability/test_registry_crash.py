"""kill -9 during a registry write, at every step: a forked child performs a hot-load's writes (the new
version file, then live.json) or a rollback's (live.json only) and SIGKILLs itself right before or after
one step of the atomic write (temp file created, half written, flushed, fsynced, renamed, folder
fsynced), or a demotion's (live.json only, its routing). A fresh Registry on the same folder must then restore
either the old live state or the new one — never a mix, a damaged file or an error — and remove the
interrupted write's temp file."""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from factors import parse_factor_set
from factors.schema import FactorSet
from server.registry import Registry

PAIRS = 4


def fs(name: str, factor: float, version: int | None = None) -> FactorSet:
    data: dict[str, Any] = {
        "name": name,
        "factors": [1.0 + factor * i / (PAIRS - 1) for i in range(PAIRS)],
        "rope_theta": 10000.0,
        "rotary_dim": 2 * PAIRS,
        "original_max_len": 128,
        "max_len": 512,
    }
    if version is not None:
        data["version"] = version
    return parse_factor_set(data)


STARTUP = [fs("a", 1.0), fs("b", 2.0)]

# Points of one atomic write where the child dies: (hooked call, before/after, which occurrence).
STEPS = [
    ("mkstemp", "before"),
    ("mkstemp", "after"),
    ("write", "half"),
    ("write", "after"),
    ("fsync-file", "before"),
    ("fsync-file", "after"),
    ("replace", "before"),
    ("replace", "after"),
    ("fsync-dir", "before"),
    ("fsync-dir", "after"),
]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_crash(step: str, when: str, nth: int) -> None:
    """In the child: SIGKILL at the ``nth`` atomic write's ``step`` (1-based)."""
    counts: dict[str, int] = {}

    def hit(name: str) -> bool:
        counts[name] = counts.get(name, 0) + 1
        return name == step and counts[name] == nth

    real_mkstemp, real_fsync, real_replace, real_fdopen = tempfile.mkstemp, os.fsync, os.replace, os.fdopen

    def mkstemp(*a: Any, **k: Any) -> Any:
        crash = hit("mkstemp")
        if crash and when == "before":
            _die()
        out = real_mkstemp(*a, **k)
        if crash:
            _die()
        return out

    def fsync(fd: int) -> None:
        import stat

        name = "fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file"
        crash = hit(name)
        if crash and when == "before":
            _die()
        real_fsync(fd)
        if crash:
            _die()

    def replace(src: Any, dst: Any) -> None:
        crash = hit("replace")
        if crash and when == "before":
            _die()
        real_replace(src, dst)
        if crash:
            _die()

    class Writer:
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def __enter__(self) -> Writer:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.fh.__exit__(*exc)

        def write(self, text: str) -> int:
            if hit("write"):
                if when == "half":
                    self.fh.write(text[: len(text) // 2])
                    self.fh.flush()
                    _die()
                self.fh.write(text)
                self.fh.flush()
                _die()
            return self.fh.write(text)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

    tempfile.mkstemp = mkstemp
    os.fsync = fsync
    os.replace = replace
    os.fdopen = lambda *a, **k: Writer(real_fdopen(*a, **k))


def hot_load(root: Path) -> None:
    """What LongRopeEngine.load_set writes: the new version file, then the live pointer."""
    reg = Registry(root)
    reg.save_version(fs("a", 3.0, version=2))
    state = reg.read_state()
    state.live["a"] = 2
    reg.write_state(state)


def rollback(root: Path) -> None:
    """What a rollback (or retire) writes: the live pointer only."""
    reg = Registry(root)
    state = reg.read_state()
    state.live["b"] = 1
    reg.write_state(state)


def demote(root: Path) -> None:
    """What a routing change writes: the live pointer's ``explicit`` list only."""
    reg = Registry(root)
    state = reg.read_state()
    state.explicit.append("b")
    reg.write_state(state)


def prepared(tmp: Path) -> Path:
    root = tmp / "registry"
    reg = Registry(root)
    reg.restore(STARTUP)
    reg.save_version(fs("b", 4.0, version=2))
    state = reg.read_state()
    state.live["b"] = 2
    reg.write_state(state)
    return root


def run_in_child(action: Callable[[Path], None], root: Path, crash: tuple[str, str, int] | None) -> int:
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no return
        try:
            if crash is not None:
                _install_crash(*crash)
            action(root)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


SCENARIOS = [  # (action, which write crashes, old state, new state); a state: live versions, explicit names
    (hot_load, 1, ({"a": 1, "b": 2}, []), ({"a": 2, "b": 2}, [])),  # crash in the version file's write
    (hot_load, 2, ({"a": 1, "b": 2}, []), ({"a": 2, "b": 2}, [])),  # crash in live.json's write
    (rollback, 1, ({"a": 1, "b": 2}, []), ({"a": 1, "b": 1}, [])),
    (demote, 1, ({"a": 1, "b": 2}, []), ({"a": 1, "b": 2}, ["b"])),
]


def restored(root: Path) -> tuple[dict[str, int], list[str]]:
    """What a restart serves: the live versions and the explicit names."""
    reg = Registry(root)
    live = {s.name: s.version for s in reg.restore(STARTUP)}
    return live, reg.read_state().explicit


CASES = [(action, nth, old, new, step, when) for action, nth, old, new in SCENARIOS for step, when in STEPS]


@pytest.mark.parametrize(
    "action,nth,old,new,step,when", CASES, ids=[f"{c[0].__name__}-write{c[1]}-{c[5]}-{c[4]}" for c in CASES]
)
def test_sigkill_at_every_step_restores_a_whole_state(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    action: Callable[[Path], None],
    nth: int,
    old: tuple[dict[str, int], list[str]],
    new: tuple[dict[str, int], list[str]],
    step: str,
    when: str,
) -> None:
    root = prepared(tmp_path)
    code = run_in_child(action, root, (step, when, nth))
    assert code == -signal.SIGKILL, f"the child was to die at {step}/{when} but exited with {code}"
    with caplog.at_level(logging.WARNING, logger="longrope.registry"):
        live = restored(root)
    assert live in (old, new), live
    if action is hot_load and (nth == 2 or live == new):  # the version file was whole before live.json moved
        assert Registry(root).load_version("a", 2).factors == fs("a", 3.0).factors
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert not list(root.rglob("*.tmp")), "the interrupted write's temp file was not cleaned up"
    for path in root.rglob("*.json"):
        json.loads(path.read_text())  # every file left is whole


def test_uninterrupted_writes_reach_the_new_state(tmp_path: Path) -> None:
    """The control: the same children without a crash end in the new state."""
    for action, _, _, new in SCENARIOS[1:]:
        root = prepared(tmp_path / action.__name__)
        assert run_in_child(action, root, None) == 0
        assert restored(root) == new
