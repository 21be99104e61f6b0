"""Admin API: list, load (hot), roll back, retire, promote and demote factor sets. Bearer-token protected;
off without a token.

    GET    /admin/factors                    live sets with version, window, λ summary, n̂, mscale, provenance, traffic,
                                             routing; the workers' RoPE memory (whatever the windows and versions)
    GET    /admin/factors/{name}             one live set, as listed
    POST   /admin/factors[?routing=explicit] load: a factor-set JSON, an HF config with a longrope block, or a
                                             multipart LongRoPE CSV (file) with name, max_len[, n_hat, mscale];
                                             ``explicit``: only requests naming the set get it
    POST   /admin/factors/{name}/rollback    make the previous version live again
    POST   /admin/factors/{name}/routing     {"routing": "auto"} promotes a set, {"routing": "explicit"} demotes it
    DELETE /admin/factors/{name}             retire a set (not the only one reaching its window)

Every error is OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``.

Length (≈425 lines): six routes and the three request formats a load accepts (JSON, HF config,
multipart CSV), with their OpenAI-shaped errors; the parsing of each format belongs to its route.
"""

from __future__ import annotations

import hmac
import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from factors.formats import MAX_FILE_BYTES, csv_factor_set, sets_from_hf_config
from factors.geometry import slot_bytes
from factors.schema import FactorSet, FactorSetError, parse_factor_set

from .catalogue import RoutingRefused, SetCatalogue, UnknownSetError, WorkerSetError
from .policy import check_routing
from .protocol import (
    ADMIN_PREFIX,
    ROUTING_PARAM,
    ROUTINGS,
    ErrorResponse,
    LoadResult,
    RetireResult,
    Routing,
    RoutingChange,
    SetListing,
    SetSummary,
)

logger = logging.getLogger("longrope.admin")

# Versions become file names and cross to the workers through msgspec (64-bit ints); far more than any
# registry will hold, far less than what breaks either.
MAX_VERSION = 2**31 - 1


class AdminError(Exception):
    def __init__(
        self, status: int, message: str, err_type: str = "invalid_request_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in (
        (400, "invalid factor set or body"),
        (401, "missing or wrong admin token"),
        (404, "unknown set, or the admin API is off"),
        (413, "body over the size limit"),
        (500, "a worker of the engine could not take the set (nothing was changed)"),
    )
}

# The load body is read by hand (three formats), so FastAPI cannot infer it; declared here so the schema
# says what a client may send and schemathesis generates real bodies for it.
LOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "a factor set (name, factors, rope_theta, rotary_dim, original_max_len, max_len"
                    "[, n_hat, mscale, version, model, provenance]) or an HF config with a longrope rope block",
                    "additionalProperties": True,
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "name", "max_len"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "LongRoPE CSV"},
                        "name": {"type": "string"},
                        "max_len": {"type": "integer"},
                        "n_hat": {"type": "integer"},
                        "mscale": {"type": "number"},
                    },
                }
            },
        },
    },
    "parameters": [
        {
            "name": "monotone",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": ["warn", "reject", "ignore"], "default": "warn"},
        },
        {
            "name": ROUTING_PARAM,
            "in": "query",
            "required": False,
            "description": "explicit: automatic routing never picks the set, only requests naming it get it"
            " (default: auto for a new name, an existing name keeps its routing)",
            "schema": {"type": "string", "enum": list(ROUTINGS)},
        },
    ],
}
ROUTING_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": RoutingChange.model_json_schema()}}}
}
MAX_ROUTING_BODY = 4096  # bytes; the body is {"routing": "explicit"}


def openai_error(
    status: int, message: str, err_type: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def set_summary(engine: SetCatalogue, fs: FactorSet) -> dict[str, Any]:
    return {
        **fs.summary(),
        "rope_state_bytes": slot_bytes(fs.rotary_dim),
        "versions": sorted(engine.history.get(fs.name, {})),
        "requests_served": engine.served.get(fs.label, 0),
        "in_flight": engine.in_flight.get(fs.label, 0),
        "routing": engine.table.routing(fs.name),
    }


ADMIN_OFF = "the admin API is off: start the server with LONGROPE_ADMIN_TOKEN or --admin-token-file"


def build_admin_router(engine: SetCatalogue, token: str | None, off_message: str = ADMIN_OFF) -> APIRouter:
    """The /admin routes. ``token`` None: every admin route answers 404 with ``off_message`` (the API is off
    here, never open)."""
    router = APIRouter(prefix=ADMIN_PREFIX, tags=["admin"], responses=ERROR_RESPONSES)

    async def require_admin(request: Request) -> None:
        if token is None:
            raise AdminError(404, off_message, "not_found")
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
        if not ok:
            raise AdminError(
                401, "missing or wrong admin token: send 'Authorization: Bearer <token>'", "authentication_error"
            )

    @router.get("/factors", dependencies=[Depends(require_admin)], response_model=SetListing)
    async def list_sets() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [set_summary(engine, fs) for fs in engine.table.sets],
            "max_model_len": engine.max_model_len,
            "rope": await engine.rope_status(),
        }

    @router.post(
        "/factors",
        status_code=201,
        dependencies=[Depends(require_admin)],
        openapi_extra=LOAD_BODY,
        response_model=LoadResult,
    )
    async def load_sets(request: Request) -> dict[str, Any]:
        routing = _routing_query(request)
        sets = await _sets_from_request(engine, request)
        for fs in sets:  # validate every set before loading any
            if fs.version is not None and fs.version > MAX_VERSION:
                raise AdminError(
                    400,
                    f"version {fs.version} is too large (at most {MAX_VERSION}); omit it to get the next one",
                    "invalid_factor_set",
                    param="version",
                )
            _checked(engine.validate_new_set, fs)
        _checked(engine.check_load_routing, sets, routing)
        loaded = []
        for fs in sets:
            loaded.append(await _checked_async(engine.load_set, fs, routing))
        return {"object": "list", "data": [set_summary(engine, fs) for fs in loaded]}

    @router.get("/factors/{name}", dependencies=[Depends(require_admin)], response_model=SetSummary)
    async def show(name: str) -> dict[str, Any]:
        return set_summary(engine, _checked(engine.live_set, name))

    @router.post(
        "/factors/{name}/routing",
        dependencies=[Depends(require_admin)],
        openapi_extra=ROUTING_BODY,
        response_model=SetSummary,
    )
    async def routing(name: str, request: Request) -> dict[str, Any]:
        wanted = await _routing_body(request)
        fs = await _checked_async(engine.set_routing, name, wanted)
        return set_summary(engine, fs)

    @router.post("/factors/{name}/rollback", dependencies=[Depends(require_admin)], response_model=SetSummary)
    async def rollback(name: str) -> dict[str, Any]:
        fs = await _checked_async(engine.rollback_set, name)
        return set_summary(engine, fs)

    @router.delete("/factors/{name}", dependencies=[Depends(require_admin)], response_model=RetireResult)
    async def retire(name: str) -> dict[str, Any]:
        fs = await _checked_async(engine.retire_set, name)
        return {"retired": fs.label}

    return router


def _checked(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except UnknownSetError as err:
        raise AdminError(404, str(err), "not_found") from None
    except RoutingRefused as err:
        raise AdminError(400, str(err), "invalid_routing") from None
    except FactorSetError as err:
        raise AdminError(400, str(err), "invalid_factor_set") from None


async def _checked_async(fn: Any, *args: Any) -> Any:
    try:
        return await fn(*args)
    except UnknownSetError as err:
        raise AdminError(404, str(err), "not_found") from None
    except RoutingRefused as err:
        raise AdminError(400, str(err), "invalid_routing") from None
    except FactorSetError as err:
        raise AdminError(400, str(err), "invalid_factor_set") from None
    except WorkerSetError as err:
        raise AdminError(500, str(err), "worker_error") from None


def _routing_query(request: Request) -> Routing | None:
    """A load's ``?routing=`` (None when absent), checked before anything is read or changed."""
    value = request.query_params.get(ROUTING_PARAM)
    if value is None:
        return None
    try:
        return check_routing(value)
    except ValueError as err:
        raise AdminError(400, str(err), param=ROUTING_PARAM) from None


async def _routing_body(request: Request) -> Routing:
    """The body of a routing change: exactly ``{"routing": "auto" | "explicit"}``."""
    expected = 'send {"routing": "auto"} to promote the set or {"routing": "explicit"} to demote it'
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_ROUTING_BODY:
        raise AdminError(
            413, f"body of {declared} bytes is larger than {MAX_ROUTING_BODY} bytes; {expected}", param="body"
        )
    raw = await request.body()
    if len(raw) > MAX_ROUTING_BODY:
        raise AdminError(413, f"body is larger than {MAX_ROUTING_BODY} bytes; {expected}", param="body")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise AdminError(400, f"body is not valid JSON; {expected}", param="body") from None
    if not isinstance(data, dict) or set(data) != {ROUTING_PARAM}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise AdminError(
            400, f"body must be an object with exactly the field routing, got {keys}; {expected}", param="body"
        )
    try:
        return check_routing(data[ROUTING_PARAM])
    except ValueError as err:
        raise AdminError(400, str(err), param=ROUTING_PARAM) from None


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_FILE_BYTES:
        raise AdminError(413, f"body of {declared} bytes is larger than the {MAX_FILE_BYTES} byte limit", param="body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FILE_BYTES:
            raise AdminError(413, f"body is larger than the {MAX_FILE_BYTES} byte limit", param="body")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise AdminError(
            400, "empty body: send a factor-set JSON object, an HF config, or a multipart CSV upload", param="body"
        )
    return body


async def _sets_from_request(engine: SetCatalogue, request: Request) -> list[FactorSet]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    monotone = request.query_params.get("monotone", "warn")
    if monotone not in ("warn", "reject", "ignore"):
        raise AdminError(400, f"monotone must be warn, reject or ignore, got {monotone!r}", param="monotone")
    if ctype == "multipart/form-data":
        return [await _csv_set(engine, request, monotone)]
    body = await _read_body(request)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdminError(400, f"body is not valid JSON: {err}", param="body") from None
    except RecursionError:
        raise AdminError(400, "body is JSON nested too deeply to be a factor set or HF config", param="body") from None
    try:
        if isinstance(data, dict) and ("rope_parameters" in data or "rope_scaling" in data):
            names = (request.query_params.get("short_name", "short"), request.query_params.get("long_name", "long"))
            return list(
                sets_from_hf_config(
                    data, short_name=names[0], long_name=names[1], monotone=monotone, source="admin upload"
                )
            )
        return [parse_factor_set(data, monotone=monotone)]
    except FactorSetError as err:
        raise AdminError(400, str(err), "invalid_factor_set") from None


async def _csv_set(engine: SetCatalogue, request: Request, monotone: str) -> FactorSet:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_FILE_BYTES:
        raise AdminError(
            413, f"upload of {declared} bytes is larger than the {MAX_FILE_BYTES} byte limit", param="file"
        )
    form = await request.form()
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise AdminError(400, "multipart upload needs a 'file' part with the LongRoPE CSV", param="file")
    if upload.size is not None and upload.size > MAX_FILE_BYTES:  # chunked uploads carry no content-length
        raise AdminError(
            413, f"CSV of {upload.size} bytes is larger than the {MAX_FILE_BYTES} byte limit", param="file"
        )
    raw = await upload.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AdminError(400, "the CSV is not UTF-8 text", param="file") from None

    def field(key: str) -> Any:
        """A form field, or the query parameter of that name."""
        value = form.get(key)
        return value if value not in (None, "") else request.query_params.get(key)

    def int_field(key: str, default: int | None = None) -> int | None:
        value = field(key)
        if value is None or value == "":
            if default is None:
                raise AdminError(400, f"field {key} is required with a CSV upload", param=key)
            return default
        try:
            return int(str(value))
        except ValueError:
            raise AdminError(400, f"field {key} must be an integer, got {value!r}", param=key) from None

    name = str(field("name") or "")
    if not name:
        raise AdminError(400, "field name is required with a CSV upload", param="name")
    mscale_raw = field("mscale")
    try:
        mscale = float(str(mscale_raw)) if mscale_raw not in (None, "") else None
    except ValueError:
        raise AdminError(400, f"field mscale must be a number, got {mscale_raw!r}", param="mscale") from None
    try:
        return csv_factor_set(
            text,
            name=name,
            geometry=engine.model_rope.geometry,
            max_len=int_field("max_len") or 0,
            n_hat=int_field("n_hat", 0) or 0,
            mscale=mscale,
            monotone=monotone,
            source=getattr(upload, "filename", None) or "upload",
        )
    except FactorSetError as err:
        raise AdminError(400, str(err), "invalid_factor_set") from None


async def _framework_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own HTTP errors (malformed multipart, a body that is not UTF-8, unknown route, wrong
    method) in the OpenAI error shape instead of ``{"detail": ...}``."""
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
    return openai_error(status, message, phrase, headers=dict(exc.headers or {}) or None)


def install_error_shape(app: Any) -> None:
    """OpenAI-shaped bodies for Starlette's HTTP errors on ``app``. vLLM 0.32 registers its handler for
    ``fastapi.HTTPException`` only, but FastAPI 0.136 raises Starlette's base class for a body it cannot
    parse, so those errors left as ``{"detail": ...}`` and broke the published ErrorResponse schema
    (found by schemathesis, tests/reliability/test_fuzz_api.py)."""
    app.add_exception_handler(StarletteHTTPException, _framework_error)


def install_admin(app: Any, engine: SetCatalogue, token: str | None, off_message: str = ADMIN_OFF) -> None:
    """Mount the admin routes and their OpenAI-shaped error handlers on ``app`` (vLLM's app, or a
    separate admin app on its own port)."""

    async def handle(request: Request, exc: AdminError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status >= 400 and exc.status != 404:
            logger.warning("admin %s %s refused (%d): %s", request.method, request.url.path, exc.status, exc.message)
        return openai_error(exc.status, exc.message, exc.err_type, exc.param, headers)

    app.add_exception_handler(AdminError, handle)
    install_error_shape(app)
    app.include_router(build_admin_router(engine, token, off_message))
