"""The Grafana dashboard against a real Prometheus scraping a real server.

Starts a tiny longrope-serve (real vLLM CPU engine) and Debian's ``prometheus`` on loopback with the repo's
scrape config (deploy/prometheus.yml, target rewritten, 1 s scrapes), sends mixed-length traffic with the
openai SDK, an upgrade, a rejected request and a hot-load, then runs every PromQL expression of the
dashboard (panels, annotations, variables) through Prometheus's HTTP API: each must return data."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from api.conftest import ADMIN_TOKEN, RunningServer, start_server
from deploy_files import PROMETHEUS_CONFIG, dashboard_queries, iter_panels, load_dashboard, substitute
from engine_harness import ids_of
from prometheus_client.parser import text_string_to_metric_families

from clients.launch import free_port

pytestmark = pytest.mark.engine

JOB = "longrope-serve"
HOT_SET = "deploy-check"


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path

    def query(self, expr: str) -> dict:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body.get("status") == "success", f"{expr!r} → {r.status_code} {r.text}"
        return body["data"]


def scrape_config_for(target: str) -> dict:
    """deploy/prometheus.yml with its longrope-serve target replaced and 1 s scrapes (the test is short)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert len(jobs) == 1, f"{PROMETHEUS_CONFIG} must have exactly one scrape job named {JOB!r}"
    assert jobs[0].get("metrics_path", "/metrics") == "/metrics"
    jobs[0]["static_configs"] = [{"targets": [target]}]
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    return config


SPECULATION = [
    "--speculative-config",
    json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}),
]


@pytest.fixture(scope="module")
def server(tiny_llama: Path, set_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # ngram speculation on, so the dashboard's speculative-decoding panels have series to show
    srv = start_server(tiny_llama, set_files, tmp_path_factory.mktemp("deploy-server"), extra_args=SPECULATION)
    yield srv
    srv.stop()


def start_prometheus(target: str, work: Path) -> Prometheus:
    """Start Debian's prometheus on loopback with deploy/prometheus.yml aimed at ``target`` (the caller waits for
    what it needs: the target up, or /-/ready)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Debian's 'prometheus' is not on PATH; `make test` installs it (scripts/install-test-tools.sh)")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config_for(target)))
    log = work / "prometheus.log"
    port = free_port()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    return Prometheus(f"http://127.0.0.1:{port}", proc, log)


@pytest.fixture(scope="module")
def prometheus(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    prom = start_prometheus(server.base.removeprefix("http://"), tmp_path_factory.mktemp("prometheus"))
    proc, log = prom.proc, prom.log
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"prometheus never scraped {server.base} as up:\n{log.read_text()}"
            try:
                targets = httpx.get(f"{prom.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
                if [t["health"] for t in targets] == ["up"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def hot_set() -> dict:
    """A valid set for the tiny model (rotary_dim 64, original window 256) with a 512-token window."""
    pairs = 32
    return {
        "name": HOT_SET,
        "factors": [1.0 + (i / (pairs - 1)) for i in range(pairs)],
        "rope_theta": 10000.0,
        "rotary_dim": 64,
        "original_max_len": 256,
        "max_len": 512,
    }


def wait_until_scraped(prometheus: Prometheus, base: str, timeout: float = 60.0) -> float:
    """Wait until Prometheus holds the server's current request total, i.e. it scraped after all traffic so
    far (a fixed sleep would assume how soon a loaded machine scrapes); returns that total."""
    served_total = sum(
        sample.value
        for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text)
        if family.name == "longrope_requests"
        for sample in family.samples
        if sample.name == "longrope_requests_total"
    )
    deadline = time.monotonic() + timeout
    while True:
        result = prometheus.query("sum(longrope_requests_total)")["result"]
        if result and float(result[0]["value"][1]) == served_total:
            return served_total
        assert time.monotonic() < deadline, f"Prometheus never reached the server's {served_total} requests: {result}"
        time.sleep(0.5)


def send_traffic(base: str, prometheus: Prometheus) -> dict[str, int]:
    """A hot-load, then two rounds of mixed-length completions and a streamed chat, an upgrade and a
    rejection each; returns requests per set.

    Prometheus scrapes between the rounds: round 1 creates every label combination's series, so rate() and
    increase() see round 2 (a counter series' first sample has no earlier one to increase from)."""
    r = httpx.post(
        f"{base}/admin/factors", json=hot_set(), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60
    )
    assert r.status_code == 201, r.text
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)

    def complete(length: int, max_tokens: int = 8, prompt: list[int] | None = None, **extra: object) -> str:
        raw = client.completions.with_raw_response.create(
            model="tiny",
            prompt=prompt or ids_of(length, length),
            max_tokens=max_tokens,
            temperature=0,
            extra_body=extra or None,
        )
        return raw.headers["x-longrope-factor-set"].split("@")[0]

    lengths = [12, 40, 90, 180, 300, 450, 700, 900, 1200, 1500, 1900, 20, 60, 250, 320, 1000]
    served: list[str] = []
    for round_ in range(2):
        if round_:
            wait_until_scraped(prometheus, base)  # round 1's series have a sample before round 2
        with ThreadPoolExecutor(4) as pool:
            served += pool.map(complete, lengths)
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello " * 30}], max_tokens=8, stream=True
        )
        assert any(chunk.choices and chunk.choices[0].delta.content is not None for chunk in stream)
        # Generation past the smallest set's window (256): the request moves up (policy ``upgrade``).
        served.append(complete(200, max_tokens=100, vllm_xargs={"longrope_policy": "upgrade"}, ignore_eos=True))
        # A prompt that repeats one span: prompt lookup drafts from it (the speculative-decoding panels).
        served.append(complete(0, max_tokens=24, prompt=ids_of(30, 7) * 4, ignore_eos=True))
        # prompt + max_tokens beyond the largest window (2048): refused at admission, reason too_long.
        with pytest.raises(openai.BadRequestError, match="exceeds the largest factor set window"):
            client.completions.create(model="tiny", prompt=ids_of(100, 1), max_tokens=2000)
    counts: dict[str, int] = {}
    for name in served:
        counts[name] = counts.get(name, 0) + 1
    return counts


def has_data(data: dict, label: str | None) -> bool:
    """Non-empty result with at least one finite value (and the label a variable lists, if any)."""
    if data["resultType"] == "scalar":
        return math.isfinite(float(data["result"][1]))
    series = data["result"]
    if label is not None:
        series = [s for s in series if label in s["metric"]]
    values = [float(s["value"][1]) for s in series]
    return any(math.isfinite(v) for v in values)


def test_every_dashboard_query_returns_data(server: RunningServer, prometheus: Prometheus) -> None:
    counts = send_traffic(server.base, prometheus)
    assert HOT_SET in counts and len(counts) >= 4, f"traffic should cover every set, got {counts}"

    # Wait until Prometheus has scraped the server's final request count.
    served_total = wait_until_scraped(prometheus, server.base)
    assert served_total >= sum(counts.values())

    queries = dashboard_queries(load_dashboard())
    assert len(queries) >= 20, f"the dashboard should have all its panels' queries, found {len(queries)}"
    instance = server.base.removeprefix("http://")
    busiest = max(counts, key=lambda name: counts[name])
    variants = [
        {"instance": ".*", "factor_set": ".*"},  # the dashboard's default: All
        {"instance": instance, "factor_set": busiest},  # one replica, one set
    ]
    failures: list[str] = []
    checked = 0
    for values in variants:
        for q in queries:
            if values is not variants[0] and "$" not in q.expr:
                continue
            expr = substitute(q.expr, values)
            checked += 1
            if not has_data(prometheus.query(expr), q.label):
                failures.append(f"{q.where} ({values}): {expr}")
    assert not failures, (
        f"{len(failures)} of {checked} dashboard queries returned no data (traffic per set: {counts}):\n"
        + "\n".join(failures)
        + "\nlabels on /metrics: "
        + json.dumps(
            sorted(
                {
                    m.split("{")[0]
                    for m in httpx.get(f"{server.base}/metrics").text.splitlines()
                    if m.startswith(("longrope_", "vllm:"))
                }
            )
        )
    )

    # The panels show the right things, not just something.
    all_values = variants[0]

    def series(title: str) -> list[dict]:
        (panel,) = [p for p in iter_panels(load_dashboard()) if p["title"] == title]
        return prometheus.query(substitute(panel["targets"][0]["expr"], all_values))["result"]

    rates = {s["metric"]["factor_set"]: float(s["value"][1]) for s in series("Requests/s by factor set")}
    assert set(counts) <= set(rates) and all(rates[name] > 0 for name in counts), (counts, rates)
    rejections = {s["metric"]["reason"]: float(s["value"][1]) for s in series("Rejections by reason")}
    assert rejections.get("too_long", 0) > 0, rejections
    loaded = {(s["metric"]["factor_set"], s["metric"]["version"]) for s in series("Loaded factor set versions")}
    assert (HOT_SET, "1") in loaded, loaded
    hot = {(s["metric"]["action"], s["metric"]["result"]) for s in series("Hot-loads by action and result")}
    assert len(hot) == 1 and next(iter(hot))[0] == "load", hot
    upgrades = series("Upgrades/s (from → to)")
    assert upgrades and all(float(s["value"][1]) > 0 for s in upgrades), upgrades
