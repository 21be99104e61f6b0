"""A real longrope-serve process (tiny model, real vLLM CPU engine) for the API tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients.launch import free_port, launch, wait_healthy

ADMIN_TOKEN = "test-admin-token-0123456789"


@dataclass
class RunningServer:
    base: str
    proc: subprocess.Popen
    log: Path
    registry: Path

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM: vLLM's launcher drains and stops the engine core and workers
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"server did not stop on SIGTERM:\n{self.log.read_text()[-4000:]}") from None


def start_server(
    model: Path,
    sets: Path | None,
    workdir: Path,
    registry: Path | None = None,
    admin: bool = True,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> RunningServer:
    """Start longrope-serve on a free loopback port and wait for /health. ``extra_args`` are appended to
    the command line; ``env`` entries override the environment (after the admin token is set or removed).
    ``sets`` None: no --factors (the model's own sets)."""
    port = free_port()
    registry = registry or workdir / "registry"
    log = workdir / f"server-{port}.log"
    cmd = [
        str(Path(sys.executable).parent / "longrope-serve"),
        "--model",
        str(model),
        "--served-model-name",
        "tiny",
        *(["--factors", str(sets)] if sets is not None else []),
        "--registry",
        str(registry),
        "--default-reserve",
        "16",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-num-seqs",
        "8",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
    ]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    full_env.pop("LONGROPE_ADMIN_TOKEN", None)
    if admin:
        full_env["LONGROPE_ADMIN_TOKEN"] = ADMIN_TOKEN
    full_env.update(env or {})
    proc = launch(cmd, log, full_env, new_session=False)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc, log, timeout=300)
    return RunningServer(base, proc, log, registry)


@pytest.fixture(scope="session")
def running(tiny_llama: Path, set_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    srv = start_server(tiny_llama, set_files, tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def server(running: RunningServer) -> str:
    return running.base
