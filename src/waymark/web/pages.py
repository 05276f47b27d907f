"""Server-rendered pages (Jinja2) with a little plain JavaScript (``static/app.js``: no build
step, no CDN). Pages show only what the signed-in user may see and offer only the actions they
may take; every action is a call of the JSON API, which checks again on the server.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from waymark.catalog.models import Vm
from waymark.engine import jobs
from waymark.engine.context import Context
from waymark.engine.running import presence
from waymark.errors import TooManyAttempts, Unauthenticated, WaymarkError
from waymark.http.security import COOKIE, hide_host_paths, sign_in, vm_for
from waymark.model import policy
from waymark.model.hardware import CHECKPOINT_TYPES
from waymark.model.policy import Decision, Principal
from waymark.text import printable
from waymark.usecases import views
from waymark.usecases.access import audit, job_scope, locations, users
from waymark.usecases.backups import overview as backup_overview
from waymark.usecases.backups import points as backups
from waymark.usecases.backups import schedules
from waymark.usecases.library import profiles
from waymark.usecases.library import store_deploy as library
from waymark.usecases.library import templates as templates_ops

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(include_in_schema=False)
CHECKPOINT_ACTIONS = ("checkpoint.create", "checkpoint.apply", "checkpoint.rename",
                      "checkpoint.export", "checkpoint.delete")
DEEP_CHAIN = 8  # reads go through every layer: warn from this depth on
# noVNC, the graphical console's viewer: Debian's novnc package, its ES modules served as they
# are under /static/novnc/ (its core/ and the vendor/ they import), no CDN and no build step
NOVNC = Path("/usr/share/novnc")
NOVNC_PARTS = ("core", "vendor")


def segment(value: object) -> str:
    """One URL path segment, every reserved character percent-encoded (``/`` too, which
    Jinja's own ``urlencode`` keeps): the ``segment`` filter of every link and API path the
    pages build from a name or id, so no name changes which URL a click goes to."""
    return quote(str(value), safe="")


templates.env.filters["segment"] = segment
# text others wrote (a stranger's request path in the audit log, a guest's output): its
# control, bidi and invisible characters shown as escapes, as the CLI prints them
templates.env.filters["printable"] = lambda value: printable(str(value))


def _ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def _signed_in(request: Request) -> tuple[Principal, str] | None:
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    try:
        return users.by_session(_ctx(request), cookie)
    except Unauthenticated:
        return None


def _page(request: Request, template: str, who: Principal | None, csrf: str | None,
          status: int = 200, **data: Any) -> HTMLResponse:
    if isinstance(data.get("error"), str) and not (who is not None and who.admin):
        data["error"] = hide_host_paths(data["error"])  # host paths: administrators only
    running = who is not None and any(
        j["status"] in jobs.UNFINISHED for j in job_scope.job_list_for(_ctx(request), who, False))
    return templates.TemplateResponse(request, template, {"who": who, "csrf": csrf,
                                                      "jobs_running": running, **data},
                                      status_code=status)


def _to_login(request: Request) -> RedirectResponse:
    here = quote(request.scope["path"])  # the decoded path, encoded again: '?' stays in it
    return RedirectResponse(f"/login?{urlencode({'next': here})}", status_code=303)


@router.get("/")
def home(request: Request) -> Response:
    return RedirectResponse("/vms" if _signed_in(request) else "/login", status_code=303)


@router.get("/login")
def login_page(request: Request, next: str = "/vms") -> Response:
    return _page(request, "login.html", None, None, next=_safe_next(next), error=None)


def _safe_next(target: str) -> str:
    """Only a path on this site (never //evil.example or a scheme)."""
    return target if target.startswith("/") and not target.startswith("//") else "/vms"


def _cross_site(request: Request) -> bool:
    """Whether a form POST comes from a page of another site (login CSRF: signing a victim's
    browser into the attacker's account). Browsers send ``Origin`` with every POST, or at
    least a ``Referer`` (this site's Referrer-Policy keeps it for its own pages); a request
    with neither comes from no browser page (a script, curl) and no page can forge it."""
    sent = request.headers.get("origin") or request.headers.get("referer")
    if sent is None:
        return False
    parts = urlsplit(sent)
    return (parts.scheme, parts.netloc) != (request.url.scheme, request.url.netloc)


def _refused(request: Request, next: str) -> Response:
    request.state.error = "a sign-in form sent from another site was refused."
    return _page(request, "login.html", None, None, 403, next=_safe_next(next),
                 error="This sign-in came from a page of another site and was refused. "
                       "Sign in here instead.")


@router.post("/login")
def login(request: Request, name: str = Form(max_length=64), password: str = Form(max_length=1024),
          next: str = Form(default="/vms", max_length=512)) -> Response:
    if _cross_site(request):
        return _refused(request, next)
    try:
        cookie, _ = sign_in(request, name, password)
    except Unauthenticated as err:
        return _page(request, "login.html", None, None, 401, next=_safe_next(next),
                     error=err.message)
    except TooManyAttempts as err:
        return _page(request, "login.html", None, None, 429, next=_safe_next(next),
                     error=err.message)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/",
                        max_age=int(users.SESSION_LIFETIME.total_seconds()))
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    if _cross_site(request):
        return _page(request, "error.html", None, None, 403,
                     error="A sign-out sent from another site was refused.")
    cookie = request.cookies.get(COOKIE)
    if cookie:
        users.logout(_ctx(request), cookie)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


def _uptime(ctx: Context, vm: dict[str, Any]) -> float | None:
    if vm["state"] not in presence.LIVE_STATES:
        return None
    found = presence.find(presence.run_files(ctx, vm["id"]))
    started = found.runtime.get("started_at") if found else None
    return round(time.time() - started) if started else None


@router.get("/vms")
def vm_list(request: Request) -> Response:
    signed = _signed_in(request)
    if signed is None:
        return _to_login(request)
    who, csrf = signed
    ctx = _ctx(request)
    backups = views.last_backups(ctx)
    owners = job_scope.owners(ctx)
    rows = []
    for vm in views.vm_list(ctx):
        owner = owners.get(vm["id"])
        if not policy.in_scope(who, vm["id"], owner):
            continue
        shown = views.vm_show(ctx, vm["id"])
        rows.append({**vm, "uptime": _uptime(ctx, vm), "last_backup": backups.get(vm["id"]),
                     "space": shown["checkpoint_space_bytes"],
                     "power": policy.decide_vm(who, "vm.power", vm["id"], owner)
                     is Decision.ALLOW})
    usable = [t["name"] for t in templates_ops.listing(ctx)
              if policy.may_use_template(who, t["name"]) is Decision.ALLOW]
    may_create = policy.decide(who, "vm.create") is Decision.ALLOW and bool(usable)
    return _page(request, "vms.html", who, csrf, vms=rows, templates=usable,
                 may_create=may_create)


def _allowed(who: Principal, vm_id: str, owner: str | None) -> dict[str, bool]:
    """What the page may offer: ``create`` ... ``delete`` (checkpoints), ``power``, ``set``,
    ``backup_view``, ``backup_run``, ``backup_restore``, ``vm_delete``."""
    actions = (*CHECKPOINT_ACTIONS, "vm.power", "vm.set", "backup.view", "backup.run",
               "backup.restore")
    may = {a.split(".")[1] if a.startswith(("checkpoint.", "vm.")) else a.replace(".", "_"):
           policy.decide_vm(who, a, vm_id, owner) is Decision.ALLOW for a in actions}
    may["vm_delete"] = policy.decide_vm(who, "vm.delete", vm_id, owner) is Decision.ALLOW
    return may


def _points(ctx: Context, vm_id: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The registered repositories, and this VM's points in them (newest first)."""
    names, points = [], []
    for loc in locations.listing(ctx):
        if loc["kind"] != "repository":
            continue
        names.append(loc["name"])
        try:
            found = backups.listing(Path(loc["path"]))
        except WaymarkError:
            continue  # an unmounted repository: listed, without points
        points += [{**p, "repository": loc["name"]} for p in found if p["vm_id"] == vm_id]
    return names, sorted(points, key=lambda p: p["created_at"], reverse=True)


def _tree(listing: dict[str, Any], now_bytes: int | None = None) -> list[dict[str, Any]]:
    """Nested nodes, oldest first at each level (newest at the bottom), Now last under the
    current checkpoint (or at the top level when there is none; ``now_bytes``: the space its
    disks' own layers hold), that checkpoint marked ``current``."""
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for c in listing["checkpoints"]:
        kids.setdefault(c["parent_id"], []).append(c)
    current = listing["current_checkpoint_id"]

    def build(parent: str | None) -> list[dict[str, Any]]:
        nodes = [{**c, "now": False, "current": c["id"] == current, "children": build(c["id"])}
                 for c in kids.get(parent, [])]
        if parent == current:
            nodes.append({"now": True, "allocated_bytes": now_bytes, "children": []})
        return nodes

    return build(None)


def _in_tree_order(nodes: list[dict[str, Any]], level: int = 1) -> list[dict[str, Any]]:
    """The tree's nodes depth-first (the order the tree shows them, Now among them), each
    with its ``level``: the rows of the space chart."""
    rows: list[dict[str, Any]] = []
    for n in nodes:
        rows += [{**n, "level": level}, *_in_tree_order(n["children"], level + 1)]
    return rows


def _vm_page(request: Request, vm: str, action: str) -> tuple[Principal, str, Vm] | Response:
    """The signed-in user and the VM they may do ``action`` to, or the page to send
    instead (sign in, or the refusal)."""
    signed = _signed_in(request)
    if signed is None:
        return _to_login(request)
    who, csrf = signed
    try:
        return who, csrf, vm_for(_ctx(request), who, action, vm)
    except WaymarkError as err:
        return _page(request, "error.html", who, csrf, err.http_status, error=err.message)


@router.get("/vms/{vm}")
def vm_page(vm: str, request: Request) -> Response:
    found = _vm_page(request, vm, "vm.view")
    if isinstance(found, Response):
        return found
    who, csrf, row = found
    ctx = _ctx(request)
    shown = views.vm_show(ctx, row.id)
    listing = views.checkpoint_list(ctx, row.id)
    may = _allowed(who, row.id, row.owner_id)
    repositories, points = _points(ctx, row.id) if may["backup_view"] else ([], [])
    exports = [loc["name"] for loc in locations.listing(ctx) if loc["kind"] == "export"]
    depth = max((d["chain_depth"] for d in shown["disks"]), default=0)
    now_bytes = sum(d.get("allocated_bytes", 0) for d in shown["disks"])
    linked = shown["consolidation"]["linked_disks"] == len(shown["disks"])  # two hops each
    biggest = max([c["allocated_bytes"] for c in listing["checkpoints"]]
                  + [c["shared_bytes"] for c in listing["checkpoints"]]
                  + [now_bytes, shown["consolidation"]["bytes"], 1])
    tree = _tree(listing, now_bytes)
    return _page(request, "vm.html", who, csrf, vm=shown, tree=tree,
                 checkpoints=listing["checkpoints"], may=may, exports=exports, depth=depth,
                 deep=depth >= DEEP_CHAIN and not linked, biggest=biggest,
                 repositories=repositories, points=points, types=CHECKPOINT_TYPES,
                 space_rows=_in_tree_order(tree),
                 summary=views.vm_summary(ctx, row.id))


def _admin_page(request: Request) -> tuple[Principal, str] | Response:
    """The signed-in administrator, or the response to send instead."""
    signed = _signed_in(request)
    if signed is None:
        return _to_login(request)
    who, csrf = signed
    if not who.admin:
        return _page(request, "error.html", who, csrf, 403,
                     error="Only administrators may open this page.")
    return signed


@router.get("/admin")
def admin(request: Request) -> Response:
    signed = _admin_page(request)
    if isinstance(signed, Response):
        return signed
    who, csrf = signed
    ctx = _ctx(request)
    vms = views.vm_list(ctx)
    return _page(request, "admin.html", who, csrf, users=users.listing(ctx),
                 tokens=users.tokens(ctx), audit=audit.listing(ctx, limit=200), vms=vms,
                 vm_names={v["id"]: v["name"] for v in vms}, templates=templates_ops.listing(ctx),
                 roles=policy.ROLES, permissions=policy.VM_PERMISSIONS)


@router.get("/library")
def library_page(request: Request) -> Response:
    signed = _admin_page(request)
    if isinstance(signed, Response):
        return signed
    who, csrf = signed
    ctx = _ctx(request)
    return _page(request, "library.html", who, csrf, profiles=profiles.listing(ctx),
                 templates=templates_ops.listing(ctx), locations=locations.listing(ctx),
                 types=CHECKPOINT_TYPES)


@router.get("/library/{name}")
def library_share(name: str, request: Request) -> Response:
    signed = _admin_page(request)
    if isinstance(signed, Response):
        return signed
    who, csrf = signed
    ctx = _ctx(request)
    try:
        held = library.listing(ctx, locations.path(ctx, name, "library"))
    except WaymarkError as err:
        return _page(request, "error.html", who, csrf, err.http_status, error=err.message)
    for vm in held["vms"]:
        vm["tree"] = _tree(vm) if "checkpoints" in vm else []
    return _page(request, "share.html", who, csrf, share=name, held=held)


def _running_vm_page(request: Request, vm: str, template: str, **extra: Any) -> Response:
    """A page about a VM's consoles (``vm.power``, as their streams): ``template`` with it."""
    found = _vm_page(request, vm, "vm.power")
    if isinstance(found, Response):
        return found
    who, csrf, row = found
    return _page(request, template, who, csrf, vm=views.vm_show(_ctx(request), row.id), **extra)


@router.get("/vms/{vm}/console")
def console_page(vm: str, request: Request) -> Response:
    return _running_vm_page(request, vm, "console.html")


@router.get("/vms/{vm}/display")
def display_page(vm: str, request: Request) -> Response:
    """The graphical console (VMConnect): noVNC over ``/api/vms/{vm}/display``."""
    return _running_vm_page(request, vm, "display.html",
                            novnc=(NOVNC / "core" / "rfb.js").is_file())


@router.get("/backups")
def backups_page(request: Request) -> Response:
    signed = _admin_page(request)
    if isinstance(signed, Response):
        return signed
    who, csrf = signed
    ctx = _ctx(request)
    return _page(request, "backups.html", who, csrf, schedules=schedules.listing(ctx),
                 overview=backup_overview.overview(ctx),
                 vms=views.vm_list(ctx), repositories=[
                     loc for loc in locations.listing(ctx) if loc["kind"] == "repository"])


TASKS_PER_PAGE = 50


@router.get("/tasks")
def tasks_page(request: Request, page: int = 1) -> Response:
    """The task history (Proxmox's task log): the jobs the user may see, newest first, one
    page of :data:`TASKS_PER_PAGE`."""
    signed = _signed_in(request)
    if signed is None:
        return _to_login(request)
    who, csrf = signed
    page = max(page, 1)
    rows, total = job_scope.history_for(_ctx(request), who, offset=(page - 1) * TASKS_PER_PAGE,
                                        limit=TASKS_PER_PAGE)
    if not who.admin:
        rows = [_without_host_paths(j) for j in rows]
    pages = max(1, -(-total // TASKS_PER_PAGE))
    return _page(request, "tasks.html", who, csrf, tasks=rows, page=page, pages=pages,
                 total=total)


def _without_host_paths(job: dict[str, Any]) -> dict[str, Any]:
    """A job as someone who is no administrator sees it: host paths left out of its error."""
    return {**job, "error": hide_host_paths(job["error"]) if job["error"] else None}
