"""``longrope-client stats``: rows come from traffic only, never from zero-initialised or version-less series."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clients.cli import main
from clients.client import parse_stats, stats

# A /metrics page as prometheus-client writes it for server/metrics.py, after: two requests on original@1 (one
# aborted outcome created at zero), a request admitted on short-8k@1 and upgraded, finished on long-16k@1; the
# latency histograms (factor_set only, no version), the loaded-sets gauge (short-8k@1, long-16k@1, spare@3),
# the _created series, a zero-initialised error counter and empty histograms for spare@3.
METRICS = """\
# HELP longrope_prompt_tokens Prompt length of admitted requests, by factor set
# TYPE longrope_prompt_tokens histogram
longrope_prompt_tokens_bucket{factor_set="original",le="16.0",version="1"} 0.0
longrope_prompt_tokens_bucket{factor_set="original",le="32.0",version="1"} 1.0
longrope_prompt_tokens_bucket{factor_set="original",le="64.0",version="1"} 2.0
longrope_prompt_tokens_bucket{factor_set="original",le="+Inf",version="1"} 2.0
longrope_prompt_tokens_count{factor_set="original",version="1"} 2.0
longrope_prompt_tokens_sum{factor_set="original",version="1"} 60.0
longrope_prompt_tokens_bucket{factor_set="short-8k",le="16.0",version="1"} 0.0
longrope_prompt_tokens_bucket{factor_set="short-8k",le="32.0",version="1"} 0.0
longrope_prompt_tokens_bucket{factor_set="short-8k",le="64.0",version="1"} 1.0
longrope_prompt_tokens_bucket{factor_set="short-8k",le="+Inf",version="1"} 1.0
longrope_prompt_tokens_count{factor_set="short-8k",version="1"} 1.0
longrope_prompt_tokens_sum{factor_set="short-8k",version="1"} 50.0
longrope_prompt_tokens_bucket{factor_set="spare",le="16.0",version="3"} 0.0
longrope_prompt_tokens_bucket{factor_set="spare",le="32.0",version="3"} 0.0
longrope_prompt_tokens_bucket{factor_set="spare",le="64.0",version="3"} 0.0
longrope_prompt_tokens_bucket{factor_set="spare",le="+Inf",version="3"} 0.0
longrope_prompt_tokens_count{factor_set="spare",version="3"} 0.0
longrope_prompt_tokens_sum{factor_set="spare",version="3"} 0.0
# HELP longrope_prompt_tokens_created Prompt length of admitted requests, by factor set
# TYPE longrope_prompt_tokens_created gauge
longrope_prompt_tokens_created{factor_set="original",version="1"} 1.7961752967421e+09
longrope_prompt_tokens_created{factor_set="short-8k",version="1"} 1.7961752967421e+09
longrope_prompt_tokens_created{factor_set="spare",version="3"} 1.7961752967421e+09
# HELP longrope_context_tokens Total context (prompt + generated) of finished requests, by factor set
# TYPE longrope_context_tokens histogram
longrope_context_tokens_bucket{factor_set="original",le="16.0",version="1"} 0.0
longrope_context_tokens_bucket{factor_set="original",le="32.0",version="1"} 0.0
longrope_context_tokens_bucket{factor_set="original",le="64.0",version="1"} 2.0
longrope_context_tokens_bucket{factor_set="original",le="+Inf",version="1"} 2.0
longrope_context_tokens_count{factor_set="original",version="1"} 2.0
longrope_context_tokens_sum{factor_set="original",version="1"} 90.0
longrope_context_tokens_bucket{factor_set="long-16k",le="16.0",version="1"} 0.0
longrope_context_tokens_bucket{factor_set="long-16k",le="32.0",version="1"} 0.0
longrope_context_tokens_bucket{factor_set="long-16k",le="64.0",version="1"} 0.0
longrope_context_tokens_bucket{factor_set="long-16k",le="+Inf",version="1"} 1.0
longrope_context_tokens_count{factor_set="long-16k",version="1"} 1.0
longrope_context_tokens_sum{factor_set="long-16k",version="1"} 9000.0
# HELP longrope_requests_total Requests by factor set and outcome (finished, aborted, error)
# TYPE longrope_requests_total counter
longrope_requests_total{factor_set="original",outcome="finished",version="1"} 2.0
longrope_requests_total{factor_set="original",outcome="aborted",version="1"} 0.0
longrope_requests_total{factor_set="long-16k",outcome="finished",version="1"} 1.0
longrope_requests_total{factor_set="spare",outcome="error",version="3"} 0.0
# HELP longrope_requests_created Requests by factor set and outcome (finished, aborted, error)
# TYPE longrope_requests_created gauge
longrope_requests_created{factor_set="original",outcome="finished",version="1"} 1.7961752967420e+09
longrope_requests_created{factor_set="original",outcome="aborted",version="1"} 1.7961752967421e+09
longrope_requests_created{factor_set="long-16k",outcome="finished",version="1"} 1.7961752967421e+09
longrope_requests_created{factor_set="spare",outcome="error",version="3"} 1.7961752967421e+09
# HELP longrope_request_latency_seconds Time from admission to the request's end, by the factor set it finished on
# TYPE longrope_request_latency_seconds histogram
longrope_request_latency_seconds_bucket{factor_set="short-8k",le="1.0"} 0.0
longrope_request_latency_seconds_bucket{factor_set="short-8k",le="+Inf"} 0.0
longrope_request_latency_seconds_count{factor_set="short-8k"} 0.0
longrope_request_latency_seconds_sum{factor_set="short-8k"} 0.0
longrope_request_latency_seconds_bucket{factor_set="long-16k",le="1.0"} 0.0
longrope_request_latency_seconds_bucket{factor_set="long-16k",le="+Inf"} 1.0
longrope_request_latency_seconds_count{factor_set="long-16k"} 1.0
longrope_request_latency_seconds_sum{factor_set="long-16k"} 3.5
# HELP longrope_time_to_first_token_seconds Time from admission to the first generated token, by the factor set the request started on
# TYPE longrope_time_to_first_token_seconds histogram
longrope_time_to_first_token_seconds_bucket{factor_set="short-8k",le="1.0"} 1.0
longrope_time_to_first_token_seconds_bucket{factor_set="short-8k",le="+Inf"} 1.0
longrope_time_to_first_token_seconds_count{factor_set="short-8k"} 1.0
longrope_time_to_first_token_seconds_sum{factor_set="short-8k"} 0.2
# HELP longrope_factor_set_loaded 1 for each live factor set version (labels carry version and window)
# TYPE longrope_factor_set_loaded gauge
longrope_factor_set_loaded{factor_set="original",version="1",window="2048"} 1.0
longrope_factor_set_loaded{factor_set="short-8k",version="1",window="8192"} 1.0
longrope_factor_set_loaded{factor_set="long-16k",version="1",window="16384"} 1.0
longrope_factor_set_loaded{factor_set="spare",version="3",window="4096"} 1.0
# HELP longrope_rejections_total Requests refused at admission, by reason
# TYPE longrope_rejections_total counter
longrope_rejections_total{reason="too_long"} 0.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 0.0
"""

EMPTY_HISTOGRAM = {"p50": None, "p90": None, "p99": None, "count": 0}


def test_rows_are_the_sets_that_served_traffic() -> None:
    data = parse_stats(METRICS)
    assert sorted(data) == ["long-16k@1", "original@1", "short-8k@1"]
    assert not any(key.endswith("@?") or key.startswith("spare") for key in data)
    original = data["original@1"]
    assert original["requests"] == {"finished": 2, "aborted": 0}
    assert original["prompt_tokens"] == {
        "p50": 32.0,
        "p90": pytest.approx(57.6),
        "p99": pytest.approx(63.36),
        "count": 2,
    }
    assert original["context_tokens"]["count"] == 2 and 32.0 < original["context_tokens"]["p50"] <= 64.0
    # admitted on short-8k (prompt observed), upgraded, finished on long-16k
    short = data["short-8k@1"]
    assert short["requests"] == {} and short["prompt_tokens"]["count"] == 1 and short["context_tokens"] == {}
    long = data["long-16k@1"]
    assert long["requests"] == {"finished": 1} and long["context_tokens"]["count"] == 1
    assert long["prompt_tokens"] == {}


def test_zero_initialised_series_make_no_row() -> None:
    assert parse_stats(METRICS.replace('version="1"', 'version="9"').replace("original", "o")).keys() == {
        "o@9",
        "long-16k@9",
        "short-8k@9",
    }
    only_zeros = "\n".join(
        line for line in METRICS.splitlines() if "spare" in line or line.startswith("#") or "latency" in line
    )
    assert parse_stats(only_zeros) == {}
    # a row that exists keeps the shape of its zero-count histograms
    zero_hist = METRICS.replace('"spare",outcome="error",version="3"} 0.0', '"spare",outcome="error",version="3"} 4.0')
    assert parse_stats(zero_hist)["spare@3"] == {
        "requests": {"error": 4},
        "prompt_tokens": EMPTY_HISTOGRAM,
        "context_tokens": {},
    }


class _Metrics(BaseHTTPRequestHandler):
    body = METRICS.encode()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def metrics_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_cli_stats_table_over_http(metrics_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert stats(metrics_url) == parse_stats(METRICS)
    assert main(["--url", metrics_url, "stats"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == ["long-16k@1", "original@1", "short-8k@1"]
    assert main(["--url", metrics_url, "stats", "--json"]) == 0
    assert "@?" not in capsys.readouterr().out
