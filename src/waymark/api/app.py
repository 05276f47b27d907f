"""The FastAPI application: the API under ``/api`` (one JSON error shape, OpenAPI at
``/api/openapi.json``) and the web portal at ``/`` (:mod:`waymark.web`).

Every error is the one envelope (:func:`waymark.errors.envelope`, as the CLI prints with
``--json``): ``{"error": {"code", "kind", "message", "hint", "exit_code", "details"}}`` with the
status its :class:`~waymark.errors.WaymarkError` class carries; bad input (a body or query that
does not validate) is 400, never 500; an unexpected exception is 500 ``internal``, logged and
audited (:func:`_unexpected`). Handlers are plain functions: FastAPI runs them in worker threads,
and each uses the catalog through its own short sessions, as the CLI does.
"""

from __future__ import annotations

import gc
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from waymark import __version__
from waymark.api import (
    accounts,
    backups,
    checkpoints,
    console,
    display,
    headers,
    jobs,
    library,
    streams,
    vms,
)
from waymark.api import quotas as quota_api
from waymark.engine.context import Context
from waymark.errors import InvalidInput, NotFound, WaymarkError, envelope
from waymark.http import limits, security
from waymark.usecases import views
from waymark.usecases.access import audit, quotas
from waymark.web import pages

log = logging.getLogger(__name__)


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
    return JSONResponse(envelope(err, message=message, hint=hint), status_code=err.http_status)


def _invalid(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)
    problems = [{"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg")}
                for e in err.errors()]
    refused = InvalidInput("the request is not valid: " + "; ".join(
        f"{p['where']}: {p['problem']}" for p in problems))
    return JSONResponse(envelope(refused, details={"problems": problems}), status_code=400)


def _http(request: Request, err: Exception) -> JSONResponse:
    """Starlette's own answers (no route: 404; a route without that method: 405)."""
    assert isinstance(err, HTTPException)
    detail = str(err.detail)
    answer, code = {404: (NotFound(detail), None),
                    405: (InvalidInput(detail), "method_not_allowed")}.get(
        err.status_code, (WaymarkError(detail), "http_error"))
    return JSONResponse(envelope(answer, code=code), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


def _unexpected(request: Request, err: Exception) -> JSONResponse:
    """An exception no handler expected (a defect): logged with its traceback under a short
    incident id, which the answer (500, code ``internal``: no traceback, no host path) and the
    audit entry name."""
    incident = secrets.token_hex(4)
    log.error("%s %s failed unexpectedly (incident %s)", request.method, request.url.path,
              incident, exc_info=err)
    request.state.error = f"unexpected {type(err).__name__}: {err} (incident {incident})"
    failure = WaymarkError(f"the server failed unexpectedly (incident {incident}).",
                           hint="Check what the request was to change, then try again; if it "
                                "fails again, tell the administrator the incident id (it is "
                                "in the server's log and audit log).")
    return JSONResponse(envelope(failure, code="internal", details={"incident": incident}),
                        status_code=500)


PREFIX = "/api"
SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
REFUSED = frozenset({401, 403, 404, 429})


async def _audited(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                   ) -> Response:
    """Record every request that changes something, every refused one and every one the
    server failed (5xx); an exception no handler expected is answered here (:func:`_unexpected`)."""
    try:
        response = await call_next(request)
    except Exception as err:  # an exception no handler expected: still answered and audited
        response = _unexpected(request, err)
    if request.method in SAFE and response.status_code not in REFUSED \
            and response.status_code < 500:
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
    """The one error envelope (:func:`waymark.errors.envelope`; the CLI prints it too)."""

    code: str = Field(description="What went wrong, in snake case: the kind's "
                                  "(not_found, quota_exceeded...) or finer (internal, "
                                  "method_not_allowed)")
    kind: str = Field(description="The waymark.errors class (NotFound, Conflict...)")
    message: str
    hint: str | None = Field(description="What to do next, when there is something to do")
    exit_code: int = Field(description="The exit code the CLI returns for it")
    details: dict[str, Any] = Field(description="More, per code: problems (invalid_input), "
                                                "incident (internal)")


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
          "500": "A tool failed (qemu-img, QEMU), or the server did (code internal: logged "
                 "and audited with an incident id)"}


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


def _limited(app: FastAPI, ctx: Context, chosen: limits.Limits) -> None:
    """The request limits (:mod:`waymark.http.limits`): the body limit outside everything else,
    and the event streams' registry."""
    app.state.streams = streams.Streams(ctx, chosen.max_streams, chosen.stream_lifetime)
    app.add_middleware(limits.BodyLimit, max_body=chosen.max_body, render=envelope)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the server runs: the VM listing's catalog rows kept between requests
    (:class:`waymark.usecases.views.VmEntries`: read again only after a commit), and what
    start-up made (routes, models, the ORM's mappers: hundreds of thousands of objects that
    live as long as the server) frozen out of the garbage collector's reach, so a full
    collection, which stops every request, no longer walks them (``gc.freeze``; undone at
    shutdown)."""
    ctx: Context | None = app.state.ctx  # (None: an app made for its OpenAPI document only)
    watch = ctx.catalog.watch() if ctx is not None else None
    if ctx is not None and watch is not None:
        app.state.vm_entries = views.VmEntries(ctx, watch.changed)
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if watch is not None:
            watch.close()


def create_app(ctx: Context, chosen: limits.Limits | None = None) -> FastAPI:
    app = FastAPI(title="Waymark", version=__version__, openapi_url="/api/openapi.json",
                  docs_url=None, redoc_url=None,  # (no explorer: docs/api.md says why)
                  lifespan=_lifespan,
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
    for module in (accounts, quota_api, vms, checkpoints, backups, jobs, library, console,
                   display):
        app.include_router(module.router, prefix=PREFIX)
    app.include_router(pages.router)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    for part in pages.NOVNC_PARTS:  # (before /static, which would take their paths)
        if (pages.NOVNC / part).is_dir():
            app.mount(f"/static/novnc/{part}", StaticFiles(directory=str(pages.NOVNC / part)),
                      name=f"novnc-{part}")
    app.mount("/static", StaticFiles(directory=str(pages.HERE / "static")), name="static")
    _limited(app, ctx, chosen or limits.Limits())
    return app
