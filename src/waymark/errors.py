"""Waymark's one error root.

Every failure Waymark reports is a :class:`WaymarkError`. Each class carries the process exit
code the CLI returns and the HTTP status the API will return, and every message says what to do
next. Third-party errors are translated at the adapter that meets them (``raise ... from err``).

The tree (exit code, HTTP status)::

    WaymarkError (1, 500)
    ├── InvalidInput (2, 400)          bad arguments: names, sizes, options
    │   ├── ConsentRequired (2, 409)   an operation that discards data needs --yes / a choice
    │   └── TooLarge (2, 413)          a request body over the server's limit
    ├── NotFound (3, 404)              unknown VM, checkpoint, disk, file
    ├── Ambiguous (4, 409)             a reference matches several objects (candidates listed)
    ├── Conflict (5, 409)              the object exists, or its state forbids the operation
    │   └── LimitReached (6, 409)      the per-VM checkpoint limit
    │       └── QuotaExceeded (6, 409) a user's quota (VMs, vCPUs, memory, disk, checkpoints)
    ├── ImageError (8, 422)            a disk image is unreadable, of a wrong format, or broken
    ├── ToolError (9, 500)             qemu-img or another tool failed
    │   └── ToolMissing (69, 500)      a needed program is not installed (names the apt package)
    ├── StorageError (73, 507)         the home folder or a file system cannot be written
    ├── Busy (75, 409)                 another command or job holds the VM; retry later
    │   ├── TooManyAttempts (75, 429)  repeated failed sign-ins: wait before trying again
    │   └── TooManyStreams (75, 429)   more open event streams than one user may have
    ├── UnknownKind (70, 500)          a journal intent, step or job kind nobody registered
    │   └── MalformedRecord (70, 500)  a stored step or intent's parameters this Waymark cannot read
    ├── Forbidden (77, 403)            the caller's role or grants do not allow it
    │   └── Unauthenticated (77, 401)  no valid session, token or password
    └── Cancelled (10, 409)            a job was cancelled on request
"""

from __future__ import annotations


class WaymarkError(Exception):
    """Root of every error Waymark raises on purpose."""

    exit_code = 1
    http_status = 500
    code: str | None = None  # a finer code for the envelope than the class's (see envelope)

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n{hint}")


class InvalidInput(WaymarkError):
    exit_code = 2
    http_status = 400


class ConsentRequired(InvalidInput):
    http_status = 409


class TooLarge(InvalidInput):
    http_status = 413


class NotFound(WaymarkError):
    exit_code = 3
    http_status = 404


class Ambiguous(WaymarkError):
    exit_code = 4
    http_status = 409


class Conflict(WaymarkError):
    exit_code = 5
    http_status = 409


class LimitReached(Conflict):
    exit_code = 6


class QuotaExceeded(LimitReached):
    """A change would take its VM's owner past a quota an administrator set
    (:mod:`waymark.usecases.access.quotas`): 409 like the per-VM checkpoint limit, since freeing
    room
    (deleting a VM or checkpoints) or a raised quota lets the same request pass; 403 stays the
    answer for what the caller's role or grants never allow."""


class ImageError(WaymarkError):
    exit_code = 8
    http_status = 422


class ToolError(WaymarkError):
    exit_code = 9
    http_status = 500


class ToolMissing(ToolError):
    exit_code = 69


class StorageError(WaymarkError):
    exit_code = 73
    http_status = 507


class Busy(WaymarkError):
    exit_code = 75
    http_status = 409


class TooManyAttempts(Busy):
    http_status = 429


class TooManyStreams(Busy):
    http_status = 429


class UnknownKind(WaymarkError):
    """A journal intent, file step or job of a kind no handler is registered for (a bug, or a
    catalog written by a newer Waymark): refused, never committed blindly. Every kind is
    registered by the composition root, :mod:`waymark.wiring`."""

    exit_code = 70
    http_status = 500


class MalformedRecord(UnknownKind):
    """A journal step or an intent's parameters in the catalog that do not have the fields
    their kind has (a field missing, of the wrong type, or unknown): refused, never half-read
    (:mod:`waymark.engine.records`)."""


class Forbidden(WaymarkError):
    exit_code = 77
    http_status = 403


class Unauthenticated(Forbidden):
    http_status = 401


class Cancelled(WaymarkError):
    """A job stopped because someone asked it to (``waymark job cancel``)."""

    exit_code = 10
    http_status = 409


def tool_failed(message: str) -> WaymarkError:
    """The error for a failed tool or QEMU job: a full file system is a StorageError (exit 73)
    with what to do, anything else a ToolError."""
    if "No space left on device" in message:
        return StorageError(message, hint="Free space on that file system, then run the "
                                          "command again: nothing was lost and it resumes "
                                          "where it stopped.")
    return ToolError(message)


# --- the one error envelope ------------------------------------------------------------------
# What the CLI prints with --json and what the API answers (docs/api.md, "Errors"):
# {"error": {"code", "kind", "message", "hint", "exit_code", "details"}}.

def public_class(err: WaymarkError) -> type[WaymarkError]:
    """The class of this module ``err`` is, or descends from (a face's own subclass, such as
    the API's out-of-scope 404, answers as its public parent)."""
    return next(c for c in type(err).__mro__
                if issubclass(c, WaymarkError) and c.__module__ == __name__)


def code_of(cls: type[WaymarkError]) -> str:
    """The error's code: its class name in snake case (``QuotaExceeded``: ``quota_exceeded``)."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in cls.__name__).lstrip("_")


def envelope(err: WaymarkError, *, code: str | None = None, message: str | None = None,
             hint: str | None = None, details: dict[str, object] | None = None
             ) -> dict[str, dict[str, object]]:
    """The error envelope of ``err`` (``message``/``hint``: its words as shown, e.g. with host
    paths hidden; ``code``: a finer code than its class gives)."""
    cls = public_class(err)
    return {"error": {"code": code or err.code or code_of(cls), "kind": cls.__name__,
                      "message": err.message if message is None else message,
                      "hint": err.hint if hint is None else hint,
                      "exit_code": err.exit_code, "details": details or {}}}


def from_envelope(error: dict[str, object]) -> WaymarkError:
    """The error an envelope's ``error`` member describes, as its class (an unknown kind: the
    root class) with its code; raises KeyError or TypeError when it is not an envelope."""
    classes = {c.__name__: c for c in _classes(WaymarkError)}
    cls = classes.get(str(error["kind"]), WaymarkError)
    hint = error.get("hint")
    err = cls(str(error["message"]), hint=hint if isinstance(hint, str) else None)
    if error["code"] != code_of(cls):
        err.code = str(error["code"])
    return err


def _classes(root: type[WaymarkError]) -> list[type[WaymarkError]]:
    return [root, *(c for sub in root.__subclasses__() if sub.__module__ == __name__
                    for c in _classes(sub))]
