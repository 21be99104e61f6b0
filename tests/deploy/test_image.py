"""The CPU image run as docs/deploy.md runs it: podman (or Docker), named volumes for /models and /registry,
the host network, port and admin token from the environment or a mounted file.

Checks in order, on one deployment: healthy by the image's own HEALTHCHECK, every process not root, a
completion through the openai SDK naming its factor set, a hot-load (401 without the token), /metrics
scraped by Debian's Prometheus with deploy/prometheus.yml, SIGTERM draining in-flight streams within the stop
timeout while a second hot-load lands, and a new container on the same volumes serving the hot-loaded
version without converting the model again. Start times are printed.

The live tests are not part of `make test`: they need the image (`make image`, ~6 min on 2 cores, 4.4 GB)
and root or sudo for podman, and run ~5 min themselves. `make test-image` builds the image and runs them
(LONGROPE_IMAGE_TEST=1); docs/deploy.md says why. The first tests (the build scripts, the graceful-stop
settings of compose and k8s) are cheap and always run."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from deploy_files import REPO
from test_deploy_prometheus import start_prometheus

from clients.launch import free_port
from server.protocol import FACTOR_SET_HEADER, FACTOR_SET_XARG

IMAGE = os.environ.get("LONGROPE_IMAGE", "localhost/longrope-serve:cpu")
MODEL = "smollm2-135m-instruct"  # the embedded default model's served name
HOT_SET = "image-check"
MANIFEST = "/models/cache/models/smollm2-135m-instruct/longrope-manifest.json"
TOKEN_IN_CONTAINER = "/run/secrets/longrope-admin-token"
DRAIN_S = 60  # --shutdown-timeout: vLLM lets running requests finish for up to this long on SIGTERM
STOP_TIMEOUT_S = 90  # the engine's SIGKILL comes this long after SIGTERM (compose: stop_grace_period)
FIRST_START_LIMIT_S = 840  # fresh volumes: conversion + compile, 114-522 s measured (idle … load 12); < pytest's 900

BUILD_SCRIPTS = ("build-image.sh", "podman-setup.sh", "make-base-image.sh", "serve-torch-wheel.sh")
live = pytest.mark.skipif(
    os.environ.get("LONGROPE_IMAGE_TEST") != "1",
    reason="runs the built image (~5 min, needs `make image` and podman or Docker): `make test-image` or "
    "LONGROPE_IMAGE_TEST=1 (docs/deploy.md)",
)


def test_build_scripts_parse_and_refuse_a_bad_variant() -> None:
    for script in BUILD_SCRIPTS:
        subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)
    r = subprocess.run(["bash", "scripts/build-image.sh", "rocm"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "must be cpu or cuda, got 'rocm'" in r.stderr, (r.returncode, r.stderr)


def test_stop_timeouts_leave_room_for_the_drain() -> None:
    """Compose and k8s pass --shutdown-timeout (vLLM aborts running requests on SIGTERM without it) shorter
    than the time they give the container before SIGKILL; the local override builds Prometheus here."""
    stack = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())["services"]
    server = stack["longrope-serve"]
    drain = int(server["command"][server["command"].index("--shutdown-timeout") + 1])
    assert 0 < drain < int(server["stop_grace_period"].removesuffix("s")), server
    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "deployment.yaml").read_text()))
    pod = next(doc for doc in docs if doc and doc.get("kind") == "Deployment")["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert 0 < int(args[args.index("--shutdown-timeout") + 1]) < pod["terminationGracePeriodSeconds"], args
    local = yaml.safe_load((REPO / "deploy" / "docker-compose.local.yml").read_text())["services"]
    build = local["prometheus"]["build"]
    assert (REPO / "deploy" / build["context"] / build["dockerfile"]).is_file(), build
    assert local["prometheus"]["image"].startswith("localhost/"), "a local build, never pulled"


def container_engine() -> str:
    """Docker when its engine answers (a client alone is not enough), else podman (`make image`'s choice)."""
    forced = os.environ.get("LONGROPE_ENGINE")
    if forced:
        return forced
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0:
        return "docker"
    if shutil.which("podman"):
        return "podman"
    pytest.fail("neither a Docker engine nor podman is here: run `make image` first (it installs podman)")


@dataclass
class Deployment:
    """Named volumes, the token file and the containers started on them (one at a time)."""

    engine: str
    work: Path
    token: str
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    container: str = ""
    port: int = 0
    start_seconds: list[float] = field(default_factory=list)
    manifest_mtime: str = ""

    @property
    def volumes(self) -> tuple[str, str]:
        return f"longrope-test-models-{self.tag}", f"longrope-test-registry-{self.tag}"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([self.engine, *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{self.engine} {' '.join(args)} → {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def logs(self) -> str:
        r = self.cli("logs", self.container, check=False)
        return r.stdout + r.stderr

    def start(self, token_from_file: bool) -> float:
        """`run` as docs/deploy.md shows it; returns the seconds until the HEALTHCHECK passes."""
        self.port = free_port()
        self.container = f"longrope-test-{self.tag}-{len(self.start_seconds)}"
        models, registry = self.volumes
        token_file = self.work / "admin-token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o644)  # read by uid 1000 in the container; the folder is the test's own
        auth = (
            ["-v", f"{token_file}:{TOKEN_IN_CONTAINER}:ro", "-e", f"LONGROPE_ADMIN_TOKEN_FILE={TOKEN_IN_CONTAINER}"]
            if token_from_file
            else ["-e", f"LONGROPE_ADMIN_TOKEN={self.token}"]
        )
        t0 = time.monotonic()
        self.cli(
            "run", "-d", "--name", self.container, "--init", "--network=host", "--shm-size=1g",
            "--stop-timeout", str(STOP_TIMEOUT_S),
            "-v", f"{models}:/models", "-v", f"{registry}:/registry",
            "-e", f"LONGROPE_PORT={self.port}", "-e", "VLLM_CPU_KVCACHE_SPACE=1", *auth,
            IMAGE, "--shutdown-timeout", str(DRAIN_S),
        )  # fmt: skip
        self.wait_healthy(t0)
        seconds = time.monotonic() - t0
        self.start_seconds.append(seconds)
        return seconds

    def wait_healthy(self, t0: float) -> None:
        """Until the image's HEALTHCHECK passes: `podman healthcheck run` (podman schedules checks through
        systemd, absent here), Docker's own schedule otherwise."""
        while True:
            state = self.cli("inspect", "--format", "{{.State.Status}}", self.container).stdout.strip()
            assert state == "running", f"container is {state}:\n{self.logs()[-5000:]}"
            if self.engine == "podman":
                healthy = self.cli("healthcheck", "run", self.container, check=False).returncode == 0
            else:
                status = self.cli("inspect", "--format", "{{.State.Health.Status}}", self.container).stdout
                healthy = status.strip() == "healthy"
            if healthy:
                return
            assert time.monotonic() - t0 < FIRST_START_LIMIT_S, (
                f"not healthy in {FIRST_START_LIMIT_S} s:\n{self.logs()}"
            )
            time.sleep(3)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=300)

    def admin(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.request(method, f"{self.base}/admin{path}", headers=headers, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    engine = container_engine()
    d = Deployment(engine, tmp_path_factory.mktemp("image"), secrets.token_hex(16))
    if d.cli("image", "exists" if engine == "podman" else "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} is missing: run `make image` (or set LONGROPE_IMAGE)")
    for volume in d.volumes:
        d.cli("volume", "create", volume)
    try:
        yield d
    finally:
        if d.container:
            d.cli("rm", "-f", d.container, check=False)
        if os.environ.get("LONGROPE_IMAGE_TEST_KEEP") != "1":
            d.cli("volume", "rm", "-f", *d.volumes, check=False)


def hot_set(mscale: float) -> dict:
    """A set for SmolLM2 (rotary_dim 64, original window 8192, rope_theta 100000) with a 16k window."""
    pairs = 32
    return {
        "name": HOT_SET,
        "factors": [1.0 + 1.0 * (i / (pairs - 1)) for i in range(pairs)],
        "rope_theta": 100000.0,
        "rotary_dim": 64,
        "original_max_len": 8192,
        "max_len": 16384,
        "mscale": mscale,
    }


def served_set(client: openai.OpenAI, **xargs: str) -> str:
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, extra_body={"vllm_xargs": xargs}
    )
    assert raw.parse().choices[0].text, "empty completion"
    return raw.headers[FACTOR_SET_HEADER]


def live_versions(d: Deployment) -> dict[str, int]:
    r = d.admin("GET", "/factors")
    assert r.status_code == 200, r.text
    return {s["name"]: s["version"] for s in r.json()["data"]}


@live
@pytest.mark.engine
def test_first_start_is_healthy_and_not_root(deployment: Deployment, capsys: pytest.CaptureFixture) -> None:
    seconds = deployment.start(token_from_file=True)
    with capsys.disabled():
        print(f"\n[image] first start on fresh volumes: healthy after {seconds:.0f} s ({deployment.engine})")
    d = deployment
    assert d.cli("inspect", "--format", "{{.Config.User}}", d.container).stdout.strip() == "1000:1000"
    uids = d.cli("exec", d.container, "sh", "-c", "grep -h '^Uid:' /proc/[0-9]*/status").stdout.split("\n")
    real = {line.split()[1] for line in uids if line.strip()}
    assert real == {"1000"}, f"every process in the container must run as uid 1000, got {uids}"
    assert "longrope.default_model" in d.logs() and "wrote " in d.logs(), "fresh volumes: the model is converted"
    d.manifest_mtime = d.cli("exec", d.container, "stat", "-c", "%Y", MANIFEST).stdout.strip()


@live
@pytest.mark.engine
def test_completion_and_hot_load(deployment: Deployment) -> None:
    d = deployment
    client = d.client()
    assert re.fullmatch(r"short-8k@\d+", served_set(client)), "a short prompt runs on the smallest default set"

    anonymous = httpx.post(f"{d.base}/admin/factors", json=hot_set(1.0), timeout=60)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    loaded = d.admin("POST", "/factors", json=hot_set(1.0))
    assert loaded.status_code == 201, loaded.text
    assert [(s["name"], s["version"]) for s in loaded.json()["data"]] == [(HOT_SET, 1)]
    assert served_set(client, **{FACTOR_SET_XARG: HOT_SET}) == f"{HOT_SET}@1"


@live
@pytest.mark.engine
def test_prometheus_scrapes_the_container(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    prom = start_prometheus(f"127.0.0.1:{d.port}", tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert prom.proc.poll() is None, f"prometheus exited:\n{prom.log.read_text()[-3000:]}"
            try:
                ready = httpx.get(f"{prom.url}/-/ready", timeout=5).status_code == 200
            except httpx.HTTPError:  # not listening yet
                ready = False
            up = prom.query('up{job="longrope-serve"}')["result"] if ready else []
            if up and up[0]["value"][1] == "1":
                break
            assert time.monotonic() < deadline, f"Prometheus never scraped {d.base} as up: {up}"
            time.sleep(0.5)
        served = prom.query("sum by (factor_set) (longrope_requests_total)")["result"]
        by_set = {s["metric"]["factor_set"]: float(s["value"][1]) for s in served}
        assert by_set.get(HOT_SET, 0) >= 1 and any(name.startswith("short") for name in by_set), by_set
        loaded = prom.query(f'longrope_factor_set_loaded{{factor_set="{HOT_SET}"}}')["result"]
        assert [s["metric"]["version"] for s in loaded] == ["1"], loaded
        hot = prom.query('longrope_hot_loads_total{action="load"}')["result"]
        assert hot and float(hot[0]["value"][1]) >= 1, hot
        assert prom.query("vllm:num_requests_running")["result"], "vLLM's engine metrics are scraped too"
    finally:
        prom.proc.terminate()
        prom.proc.wait(30)


def stream_to_end(client: openai.OpenAI, started: list[int], index: int, max_tokens: int) -> tuple[str | None, int]:
    """One long streamed completion; returns (finish_reason, chunks with text)."""
    stream = client.completions.create(
        model=MODEL,
        prompt=f"Story number {index}: once upon a time",
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    finish, pieces = None, 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            pieces += 1
            if pieces == 1:
                started.append(index)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return finish, pieces


@live
@pytest.mark.engine
def test_sigterm_drains_in_flight_requests(deployment: Deployment, capsys: pytest.CaptureFixture) -> None:
    d = deployment
    client = d.client()
    streams, max_tokens = 3, 160
    started: list[int] = []
    with ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(stream_to_end, client, started, i, max_tokens) for i in range(streams)]
        deadline = time.monotonic() + 120
        while len(started) < streams:
            assert time.monotonic() < deadline, "the streams never started"
            time.sleep(0.1)
        # A hot-load lands while they run: version 2 of the set, written to the registry volume.
        reloaded = d.admin("POST", "/factors", json=hot_set(1.05))
        assert reloaded.status_code == 201, reloaded.text
        t0 = time.monotonic()
        d.cli("stop", "-t", str(STOP_TIMEOUT_S), d.container, timeout=STOP_TIMEOUT_S + 60)
        stop_seconds = time.monotonic() - t0
        results = [f.result(timeout=30) for f in futures]
    assert all(finish == "length" for finish, _ in results), f"every in-flight stream ends normally: {results}"
    assert all(pieces >= max_tokens // 2 for _, pieces in results), results
    exit_code = d.cli("inspect", "--format", "{{.State.ExitCode}}", d.container).stdout.strip()
    logs = d.logs()
    assert exit_code == "0", f"SIGTERM must end the server cleanly (137 = killed at the stop timeout):\n{logs[-4000:]}"
    assert stop_seconds < STOP_TIMEOUT_S, stop_seconds
    assert "mode=drain" in logs, logs[-4000:]
    with capsys.disabled():
        print(f"\n[image] SIGTERM with {streams} streams in flight: all finished, stopped in {stop_seconds:.1f} s")


@live
@pytest.mark.engine
def test_restart_on_the_same_volumes(deployment: Deployment, capsys: pytest.CaptureFixture) -> None:
    d = deployment
    assert d.manifest_mtime, "the first start did not record the model's manifest"
    d.cli("rm", d.container)
    seconds = d.start(token_from_file=False)  # this time the token comes from the environment
    with capsys.disabled():
        print(f"\n[image] start on the same volumes: healthy after {seconds:.0f} s (first: {d.start_seconds[0]:.0f} s)")
    logs = d.logs()
    assert "wrote " not in logs and "re-converting" not in logs, f"the model was converted again:\n{logs[-4000:]}"
    assert d.cli("exec", d.container, "stat", "-c", "%Y", MANIFEST).stdout.strip() == d.manifest_mtime
    assert live_versions(d).get(HOT_SET) == 2, "the version hot-loaded before SIGTERM is live again"
    assert served_set(d.client(), **{FACTOR_SET_XARG: HOT_SET}) == f"{HOT_SET}@2"
    summary = d.admin("GET", f"/factors/{HOT_SET}")
    assert summary.status_code == 200 and summary.json()["versions"] == [1, 2], summary.text
