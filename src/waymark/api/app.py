"""The FastAPI application: the API under ``/api`` (one JSON error shape, OpenAPI at
``/api/openapi.json``) and the web portal at ``/`` (:mod:`waymark.web`).

Every error is ``{"error": {"code", "message", "details"}}`` with the status its
:class:`~waymark.errors.WaymarkError` class carries; bad input (a body or query that does not
validate) is 400, never 500. Handlers are plain functions: FastAPI runs them in worker threads,
and each uses the catalog through its own short sessions, as the CLI does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from waymark import __version__
from waymark.api import (
    accounts,
    backups,
    checkpoints,
    console,
    headers,
    jobs,
    library,
    streams,
    vms,
)
from waymark.api import quotas as quota_api
from waymark.engine.context import Context
from waymark.errors import WaymarkError
from waymark.http import limits, security
from waymark.usecases.access import audit, quotas
from waymark.web import pages

log = logging.getLogger(__name__)


def error_body(code: str, message: str, details: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _code(err: WaymarkError) -> str:
    fixed = getattr(err, "code", None)
    if isinstance(fixed, str):
        return fixed
    name = type(err).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _waymark_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, WaymarkError)
    request.state.error = err.message
    request.state.refused = isinstance(err, security.OutOfScope)
    if err.http_status >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, err.message)
    message, hint = err.message, err.hint
    caller = getattr(request.state, "caller", None)
    if caller is None or not caller.who.admin:  # host paths are an administrator's to see
        message, hint = security.hide_host_paths(message), hint and security.hide_host_paths(hint)
    return JSONResponse(error_body(_code(err), message, {"hint": hint} if hint else None),
                        status_code=err.http_status)


def _invalid(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)
    problems = [{"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg")}
                for e in err.errors()]
    return JSONResponse(error_body("invalid_input", "the request is not valid: " + "; ".join(
        f"{p['where']}: {p['problem']}" for p in problems), {"problems": problems}),
        status_code=400)


def _http(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return JSONResponse(error_body(code, str(err.detail)), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


PREFIX = "/api"
SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
REFUSED = frozenset({401, 403, 404, 429})


async def _audited(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                   ) -> Response:
    """Record every request that changes something and every refused one."""
    response = await call_next(request)
    if request.method in SAFE and response.status_code not in REFUSED:
        return response
    caller = getattr(request.state, "caller", None)
    entry = audit.Entry(
        method=request.method, status=response.status_code,
        action=f"{request.method} {_route(request)}",
        refused=getattr(request.state, "refused", False),
        user=caller.who.name if caller else getattr(request.state, "login_name", None),
        role=caller.who.role if caller else None,
        via=caller.via if caller else ("password" if request.url.path == "/api/auth/login"
                                        else "none"),
        client=request.client.host if request.client else None,
        target=dict(request.scope.get("path_params") or {}),
        message=getattr(request.state, "error", None))
    anonymous = caller is None and response.status_code >= 400  # bounded: see ops.audit
    try:
        await run_in_threadpool(request.app.state.audit.record, request.app.state.ctx, entry,
                                anonymous=anonymous)
    except WaymarkError as err:  # the request's outcome stands; say it was not recorded
        log.error("could not write the audit log: %s", err.message)
    return response


async def _quota_scope(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                       ) -> Response:
    """A request's changes count against quotas unless an administrator makes them (the
    caller is named once authenticated, :func:`waymark.http.security.caller`)."""
    with quotas.request():
        return await call_next(request)


def _route(request: Request) -> str:
    """The route's path template (``/api/vms/{vm}``), or the path when none matched (routers
    are included under :data:`PREFIX`; the matched route names its path below it)."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return request.url.path
    return path if path.startswith(PREFIX + "/") else PREFIX + path


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class ErrorBody(BaseModel):
    """Every error answer (``waymark.errors``: the status comes from the error's class)."""

    error: ErrorDetail


ERRORS = {"400": "Invalid input (details.problems for a body or query that does not "
                 "validate)",
          "401": "Not signed in: no valid session or token",
          "403": "Forbidden: the caller's role or grants do not allow it (nothing changed)",
          "404": "Not found, or outside the caller's scope",
          "409": "Conflict: the object's state, a needed confirmation, or busy (names the job)",
          "413": "The request body is larger than the server takes (waymark serve "
                 "--max-body)",
          "429": "Too many failed sign-ins, or as many event streams open as one user may "
                 "have",
          "500": "A tool failed (qemu-img, QEMU)"}


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document with the errors the API really sends (one shape, :class:`ErrorBody`)
    and without FastAPI's 422, which it never sends (bad input is 400)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=app.description)
        error = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(error.pop("$defs", {}))
        components["ErrorBody"] = error
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        for operations in schema["paths"].values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for code, text in ERRORS.items():
                    responses.setdefault(code, {"description": text, "content": body})
        app.openapi_schema = schema
        return schema

    return build


def _error_json(err: WaymarkError) -> dict[str, Any]:
    """The error body for a refusal made outside the app's error handlers (the limits)."""
    return error_body(_code(err), err.message, {"hint": err.hint} if err.hint else None)


def _limited(app: FastAPI, ctx: Context, chosen: limits.Limits) -> None:
    """The request limits (:mod:`waymark.http.limits`): the body limit outside everything else,
    and the event streams' registry."""
    app.state.streams = streams.Streams(ctx, chosen.max_streams, chosen.stream_lifetime)
    app.add_middleware(limits.BodyLimit, max_body=chosen.max_body, render=_error_json)


def create_app(ctx: Context, chosen: limits.Limits | None = None) -> FastAPI:
    app = FastAPI(title="Waymark", version=__version__, openapi_url="/api/openapi.json",
                  docs_url=None, redoc_url=None,  # (no explorer: docs/api.md says why)
                  description="Hyper-V style checkpoints and backups for QEMU/KVM VMs.")
    app.state.ctx = ctx
    app.state.limiter = security.LoginLimiter()
    app.state.audit = audit.Recorder()
    app.add_exception_handler(WaymarkError, _waymark_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http)
    app.middleware("http")(_audited)
    app.add_middleware(headers.SecurityHeaders)
    app.middleware("http")(_quota_scope)
    for module in (accounts, quota_api, vms, checkpoints, backups, jobs, library, console):
        app.include_router(module.router, prefix=PREFIX)
    app.include_router(pages.router)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    app.mount("/static", StaticFiles(directory=str(pages.HERE / "static")), name="static")
    _limited(app, ctx, chosen or limits.Limits())
    return app
