"""Python clients of longrope-serve: the admin API (sync and async, typed), an OpenAI SDK helper, and
per-set statistics read from ``/metrics``. HTTP only; the factor-set schema is the ``factors`` one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx

from factors.formats import factor_set_json
from factors.schema import FactorSet
from server.protocol import FACTOR_SET_HEADER as HEADER
from server.protocol import FACTOR_SET_XARG, ROUTING_PARAM, LambdaSummary, Routing, SetSummary

__all__ = [
    "AdminClient",
    "AsyncAdminClient",
    "LambdaSummary",
    "LongRopeError",
    "Routing",
    "SetSummary",
    "ServerUnavailable",
    "named_set",
]

DEFAULT_URL = "http://127.0.0.1:8000"


class LongRopeError(RuntimeError):
    """The server refused a call; ``status`` and ``type`` are from its OpenAI-shaped error."""

    def __init__(self, status: int, message: str, err_type: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.type = status, message, err_type


class ServerUnavailable(LongRopeError):
    """No server answered at the URL (down, wrong port, or still starting)."""

    def __init__(self, url: str, cause: Exception) -> None:
        super().__init__(
            0, f"no longrope-serve answered at {url} ({type(cause).__name__}: {cause}); is it running?", "unavailable"
        )


def _raise_for_error(resp: httpx.Response) -> Any:
    if resp.status_code < 400:
        return resp.json()
    try:
        err = resp.json()["error"]
        message, err_type = err.get("message", resp.text), err.get("type")
    except (ValueError, KeyError, TypeError):
        message, err_type = resp.text[:500] or resp.reason_phrase, None
    if resp.status_code == 401:
        message = f"{message} (check LONGROPE_ADMIN_TOKEN / --token)"
    raise LongRopeError(resp.status_code, message, err_type)


def _load_request(item: FactorSet | dict[str, Any] | str | Path) -> dict[str, Any]:
    """Keyword arguments of the POST for a set object, a dict (set or HF config) or a JSON file."""
    if isinstance(item, FactorSet):
        return {"content": factor_set_json(item), "headers": {"Content-Type": "application/json"}}
    if isinstance(item, dict):
        return {"json": item}
    return {"content": Path(item).read_bytes(), "headers": {"Content-Type": "application/json"}}


def _csv_request(
    path: str | Path, name: str, max_len: int, n_hat: int = 0, mscale: float | None = None
) -> dict[str, Any]:
    data = {"name": name, "max_len": str(max_len), "n_hat": str(n_hat)}
    if mscale is not None:
        data["mscale"] = str(mscale)
    p = Path(path)
    return {"files": {"file": (p.name, p.read_bytes(), "text/csv")}, "data": data}


def _load_params(routing: Routing | None, monotone: str | None = None) -> dict[str, str]:
    """Query parameters of a load: ``routing`` None leaves it to the server (auto for a new name, an existing
    name keeps its own)."""
    params = {"monotone": monotone} if monotone is not None else {}
    return {**params, ROUTING_PARAM: routing} if routing is not None else params


def named_set(name: str) -> dict[str, Any]:
    """The OpenAI SDK's ``extra_body`` that runs a request on the set ``name``, pinned to it (an ``explicit``
    set too): ``client.completions.create(..., extra_body=named_set("long-64k"))``."""
    return {"vllm_xargs": {FACTOR_SET_XARG: name}}


class AdminClient:
    """Synchronous admin client: ``AdminClient(url, token).list()`` etc."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as err:
            raise ServerUnavailable(self.url, err) from None
        return _raise_for_error(resp)

    def list(self) -> list[SetSummary]:
        return [SetSummary.model_validate(s) for s in self._call("GET", "/admin/factors")["data"]]

    def get(self, name: str) -> SetSummary:
        """One live set, as listed (LongRopeError 404 when no live set has that name)."""
        return SetSummary.model_validate(self._call("GET", f"/admin/factors/{name}"))

    def load(
        self, item: FactorSet | dict[str, Any] | str | Path, monotone: str = "warn", routing: Routing | None = None
    ) -> list[SetSummary]:
        """Load a set (or an HF config's two sets); returns what became live. ``routing="explicit"``: only
        requests naming the set get it, until :meth:`set_routing` promotes it."""
        body = self._call("POST", "/admin/factors", params=_load_params(routing, monotone), **_load_request(item))
        return [SetSummary.model_validate(s) for s in body["data"]]

    def load_csv(
        self,
        path: str | Path,
        name: str,
        max_len: int,
        n_hat: int = 0,
        mscale: float | None = None,
        routing: Routing | None = None,
    ) -> SetSummary:
        kw = _csv_request(path, name, max_len, n_hat, mscale)
        body = self._call("POST", "/admin/factors", params=_load_params(routing), **kw)
        return SetSummary.model_validate(body["data"][0])

    def set_routing(self, name: str, routing: Routing) -> SetSummary:
        """Promote (``"auto"``) or demote (``"explicit"``) a live set."""
        return SetSummary.model_validate(
            self._call("POST", f"/admin/factors/{name}/routing", json={ROUTING_PARAM: routing})
        )

    def rollback(self, name: str) -> SetSummary:
        return SetSummary.model_validate(self._call("POST", f"/admin/factors/{name}/rollback"))

    def retire(self, name: str) -> str:
        return self._call("DELETE", f"/admin/factors/{name}")["retired"]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAdminClient:
    """Asynchronous twin of :class:`AdminClient`."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = await self._http.request(method, path, **kw)
        except httpx.TransportError as err:
            raise ServerUnavailable(self.url, err) from None
        return _raise_for_error(resp)

    async def list(self) -> list[SetSummary]:
        return [SetSummary.model_validate(s) for s in (await self._call("GET", "/admin/factors"))["data"]]

    async def get(self, name: str) -> SetSummary:
        return SetSummary.model_validate(await self._call("GET", f"/admin/factors/{name}"))

    async def load(
        self, item: FactorSet | dict[str, Any] | str | Path, monotone: str = "warn", routing: Routing | None = None
    ) -> list[SetSummary]:
        params = _load_params(routing, monotone)
        body = await self._call("POST", "/admin/factors", params=params, **_load_request(item))
        return [SetSummary.model_validate(s) for s in body["data"]]

    async def load_csv(
        self,
        path: str | Path,
        name: str,
        max_len: int,
        n_hat: int = 0,
        mscale: float | None = None,
        routing: Routing | None = None,
    ) -> SetSummary:
        kw = _csv_request(path, name, max_len, n_hat, mscale)
        body = await self._call("POST", "/admin/factors", params=_load_params(routing), **kw)
        return SetSummary.model_validate(body["data"][0])

    async def set_routing(self, name: str, routing: Routing) -> SetSummary:
        body = await self._call("POST", f"/admin/factors/{name}/routing", json={ROUTING_PARAM: routing})
        return SetSummary.model_validate(body)

    async def rollback(self, name: str) -> SetSummary:
        return SetSummary.model_validate(await self._call("POST", f"/admin/factors/{name}/rollback"))

    async def retire(self, name: str) -> str:
        return (await self._call("DELETE", f"/admin/factors/{name}"))["retired"]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncAdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def openai_client(url: str = DEFAULT_URL, api_key: str = "unused", **kwargs: Any) -> Any:
    """An ``openai.OpenAI`` client pointed at the server's ``/v1``."""
    import openai

    return openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key, **kwargs)


def factor_set_of(response: Any) -> str | None:
    """``NAME@VERSION`` that served a response: from a raw/streaming response's header, or from the
    ``longrope_factor_set`` field of a parsed object."""
    headers = getattr(response, "headers", None)
    if headers is not None and headers.get(HEADER):
        return headers.get(HEADER)
    extra = getattr(response, "model_extra", None) or {}
    return extra.get("longrope_factor_set")


# -- statistics from /metrics --------------------------------------------------------------------


def _histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


# The per-request series of server/metrics.py that carry factor_set *and* version. Other series with a
# factor_set label are not rows: the latency histograms carry no version (a request may end on another set
# than it started on), and the loaded-sets gauge says what is live, not what served traffic.
_REQUESTS = "longrope_requests"
_TOKEN_HISTOGRAMS = {"longrope_prompt_tokens": "prompt_tokens", "longrope_context_tokens": "context_tokens"}


def parse_stats(text: str) -> dict[str, Any]:
    """Per-set statistics from the text of a ``/metrics`` page (Prometheus exposition format).

    One row per ``NAME@VERSION`` that served traffic: ``requests`` by outcome (finished, aborted, error) and,
    per token histogram, ``count`` and p50/p90/p99 (``None`` when it has no observation). A series created at
    zero (a counter or histogram touched but never incremented) or one without a ``version`` label makes no
    row."""
    from prometheus_client.parser import text_string_to_metric_families

    requests: dict[str, dict[str, int]] = {}
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        metric = _TOKEN_HISTOGRAMS.get(family.name)
        if family.name != _REQUESTS and metric is None:
            continue
        wanted = f"{_REQUESTS}_total" if metric is None else f"{family.name}_bucket"
        for s in family.samples:
            if s.name != wanted or not s.labels.get("factor_set") or not s.labels.get("version"):
                continue
            key = f"{s.labels['factor_set']}@{s.labels['version']}"
            if metric is None:
                row = requests.setdefault(key, {})
                outcome = s.labels.get("outcome", "unknown")
                row[outcome] = row.get(outcome, 0) + int(s.value)
            else:
                buckets.setdefault((key, metric), []).append((float(s.labels["le"]), s.value))
    served = {key for key, row in requests.items() if sum(row.values()) > 0}
    served |= {key for (key, _), bs in buckets.items() if max(c for _, c in bs) > 0}
    out: dict[str, dict[str, Any]] = {
        key: {"requests": requests.get(key, {}), "prompt_tokens": {}, "context_tokens": {}} for key in sorted(served)
    }
    for (key, metric), bs in buckets.items():
        if key in out:
            out[key][metric] = {f"p{int(q * 100)}": _histogram_quantile(q, bs) for q in (0.5, 0.9, 0.99)}
            out[key][metric]["count"] = int(max(c for _, c in bs))
    return out


def stats(url: str = DEFAULT_URL, timeout: float = 30.0) -> dict[str, Any]:
    """Per set@version: requests by outcome, and p50/p90/p99 of prompt and total context tokens
    (:func:`parse_stats` of the server's ``/metrics``)."""
    try:
        text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout).text
    except httpx.TransportError as err:
        raise ServerUnavailable(url, err) from None
    return parse_stats(text)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=lambda o: o.model_dump() if hasattr(o, "model_dump") else str(o))
