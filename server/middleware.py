"""The response side of admission: every response of an admitted request says which factor set served it.

:class:`FactorSetHeaderMiddleware` (pure ASGI) holds the admissions made while one HTTP request is handled
(the scope of :meth:`server.admission.Admission.http_request`), labels the response's headers, JSON body or
streamed chunks, and answers 503 once the engine died.
"""

from __future__ import annotations

import json
from typing import Any

from .engine import LongRopeEngine
from .policy import Assignment
from .protocol import FACTOR_SET_FIELD as BODY_FIELD
from .protocol import FACTOR_SET_HEADER as HEADER
from .protocol import UPGRADES_FIELD, UPGRADES_HEADER


def _labels(holder: list[Assignment]) -> tuple[str, str | None]:
    """The set label(s) the request's prompts are on now (after any upgrade), and their upgrade paths."""
    label = ",".join(dict.fromkeys(a.final.key for a in holder))
    paths = [a.upgrades for a in holder if a.upgrades]
    return label, (",".join(paths) if paths else None)


def _with_fields(data: bytes, fields: dict[str, str]) -> bytes | None:
    """The JSON object ``data`` with the given fields added (None when it is not a JSON object)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or "error" in obj:
        return None
    obj.update(fields)
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse_with_fields(chunk: bytes, fields: dict[str, str]) -> bytes:
    """Add the fields to every ``data: {...}`` event of a server-sent-events chunk."""
    lines = chunk.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data: {"):
            updated = _with_fields(line[6:], fields)
            if updated is not None:
                lines[i] = b"data: " + updated
    return b"\n".join(lines)


def _fields(holder: list[Assignment]) -> dict[str, str]:
    label, upgrades = _labels(holder)
    return {BODY_FIELD: label, **({UPGRADES_FIELD: upgrades} if upgrades else {})}


RETRY_AFTER = (b"retry-after", b"30")


async def _send_engine_dead(send: Any) -> None:
    """503 in OpenAI's error shape: the engine process died; the server is stopping (a supervisor restarts it)."""
    body = json.dumps(
        {
            "error": {
                "message": "the inference engine has stopped (engine process died); the server is shutting down"
                " — retry against a healthy replica or after the restart",
                "type": "ServiceUnavailableError",
                "param": None,
                "code": 503,
            }
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), RETRY_AFTER]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class FactorSetHeaderMiddleware:
    """Pure ASGI middleware: every response of an admitted request says which set served it.

    - ``x-longrope-factor-set``: the set the request finished on (for a streamed response, the set it
      started on: headers go out first), and ``x-longrope-upgrades: a@1>b@1`` when it moved up;
    - a ``longrope_factor_set`` field (and ``longrope_upgrades`` once moved) in the JSON body, or in every
      streamed chunk, where it names the set that chunk's tokens came from (OpenAI clients ignore unknown
      fields).

    Each HTTP request runs inside its admission scope, which ends the admissions whose request never reached
    the engine (e.g. refused by a later validation)."""

    def __init__(self, app: Any, engine: LongRopeEngine) -> None:
        self.app = app
        self.engine = engine

    def _engine_dead(self) -> bool:
        return bool(getattr(self.engine.engine, "errored", False))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._engine_dead() and scope.get("path", "").startswith("/v1/"):
            await _send_engine_dead(send)
            return
        async with self.engine.admission.http_request() as admissions:
            await self._annotated(scope, receive, send, admissions.admitted)

    async def _annotated(self, scope: dict, receive: Any, send: Any, holder: list[Assignment]) -> None:
        state: dict[str, Any] = {"start": None, "mode": "pass", "body": []}

        def with_headers(message: dict) -> dict:
            label, upgrades = _labels(holder)
            headers = [*message.get("headers", []), (HEADER.encode(), label.encode())]
            if upgrades:
                headers.append((UPGRADES_HEADER.encode(), upgrades.encode()))
            return {**message, "headers": headers}

        async def send_annotated(message: dict) -> None:
            if message["type"] == "http.response.start":
                if message.get("status") == 500 and self._engine_dead():
                    # vLLM answers a request cut off by the engine's death with 500; it is unavailability
                    message = {**message, "status": 503, "headers": [*message.get("headers", []), RETRY_AFTER]}
                if not holder:
                    await send(message)
                    return
                ctype = next((v for k, v in message.get("headers", []) if k.lower() == b"content-type"), b"")
                if ctype.startswith(b"application/json"):
                    state["start"], state["mode"] = message, "json"  # sent with the body, when it is complete
                    return
                state["mode"] = "sse" if ctype.startswith(b"text/event-stream") else "pass"
                await send(with_headers(message))
                return
            if message["type"] != "http.response.body" or state["mode"] == "pass":
                await send(message)
                return
            if state["mode"] == "sse":
                await send({**message, "body": _sse_with_fields(message.get("body", b""), _fields(holder))})
                return
            state["body"].append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(state["body"])
            body = _with_fields(body, _fields(holder)) or body
            start = with_headers(state["start"])
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, send_annotated)
