"""Reliability suite: one shared real server (tiny model, admin on) for the bad-input, admin-security and
soak tests; the fault tests start (and kill) their own. ``--run-slow`` (or ``LONGROPE_RUN_SLOW=1``) runs the
longer variants marked ``slow``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api.conftest import RunningServer, start_server
from reliability.common import run_slow


def pytest_addoption(parser: pytest.Parser) -> None:
    try:
        parser.addoption("--run-slow", action="store_true", default=False, help="run the longer 'slow' variants")
    except ValueError:  # already registered by another conftest
        pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if run_slow(config):
        return
    skip = pytest.mark.skip(reason="longer variant: run with --run-slow or LONGROPE_RUN_SLOW=1")
    here = Path(__file__).parent
    for item in items:
        if "slow" in item.keywords and here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rel_server(tiny_llama: Path, set_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A real longrope-serve (tiny Llama; sets original@1 ≤256, mid@1 ≤1024, nhat@1 ≤2048) with a registry."""
    srv = start_server(tiny_llama, set_files, tmp_path_factory.mktemp("reliability-server"))
    yield srv
    srv.stop()
