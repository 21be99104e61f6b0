"""Start a server process on a free loopback port and wait until it answers ``/health`` (HTTP only).

Used by the benchmarks (:mod:`clients.bench`, :mod:`clients.vllm_bench`), the scripts and the test suite, so
every one of them starts and stops servers the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def default_model_path() -> str:
    """The embedded default model's folder, prepared if needed (``longrope-prepare-model`` of this Python)."""
    tool = Path(sys.executable).parent / "longrope-prepare-model"
    out = subprocess.run([str(tool), "--print-path"], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], log: Path, env: dict[str, str], new_session: bool = True) -> subprocess.Popen:
    """Start ``cmd`` with stdout and stderr in ``log``; in its own process group unless ``new_session`` is
    False (then :func:`stop` signals only the process itself)."""
    with log.open("w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=new_session)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    """Return once ``url``/health answers 200; raise with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} ({log}):\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server at {url} not healthy after {timeout:.0f} s ({log}):\n{_tail(log)}")


def stop(proc: subprocess.Popen, timeout: float = 90) -> bool:
    """SIGTERM (vLLM's launcher drains and stops its engine processes), SIGKILL after ``timeout`` seconds.
    Returns whether it stopped on SIGTERM."""
    if proc.poll() is not None:
        return True
    group = os.getpgid(proc.pid) == proc.pid

    def send(sig: int) -> None:
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(30)
        return False


def _tail(log: Path, chars: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
