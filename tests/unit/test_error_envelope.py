"""The one error envelope (:func:`waymark.errors.envelope`): its members for every class, a
face's own subclass answering as its public parent, and the way back
(:func:`waymark.errors.from_envelope`, what the remote CLI raises)."""

from __future__ import annotations

import pytest

from waymark import errors
from waymark.errors import WaymarkError, envelope, from_envelope
from waymark.http.security import OutOfScope

ALL = [errors.WaymarkError, errors.InvalidInput, errors.ConsentRequired, errors.TooLarge,
       errors.NotFound, errors.Ambiguous, errors.Conflict, errors.LimitReached,
       errors.QuotaExceeded, errors.ImageError, errors.ToolError, errors.ToolMissing,
       errors.StorageError, errors.Busy, errors.TooManyAttempts, errors.TooManyStreams,
       errors.Forbidden, errors.Unauthenticated, errors.Cancelled]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_class_goes_there_and_back(cls: type[WaymarkError]) -> None:
    body = envelope(cls("what is wrong.", hint="what to do."))
    assert body == {"error": {"code": errors.code_of(cls), "kind": cls.__name__,
                              "message": "what is wrong.", "hint": "what to do.",
                              "exit_code": cls.exit_code, "details": {}}}
    back = from_envelope(body["error"])
    assert type(back) is cls and (back.message, back.hint) == ("what is wrong.", "what to do.")
    assert envelope(back) == body


def test_codes_are_the_class_names_in_snake_case() -> None:
    assert [errors.code_of(c) for c in (errors.QuotaExceeded, errors.NotFound,
                                        errors.TooManyStreams)] == \
        ["quota_exceeded", "not_found", "too_many_streams"]


def test_a_faces_subclass_answers_as_its_public_parent() -> None:
    """The API's out-of-scope 404 is indistinguishable from a true one."""
    hidden = envelope(OutOfScope("no VM is named 'x'."))
    assert hidden == envelope(errors.NotFound("no VM is named 'x'."))


def test_a_finer_code_and_shown_words_survive() -> None:
    err = WaymarkError("the server failed unexpectedly (incident 0a1b2c3d).")
    body = envelope(err, code="internal", message="shown", hint="next",
                    details={"incident": "0a1b2c3d"})
    assert body["error"] == {"code": "internal", "kind": "WaymarkError",
                             "message": "shown", "hint": "next", "exit_code": 1,
                             "details": {"incident": "0a1b2c3d"}}
    back = from_envelope(body["error"])
    assert envelope(back)["error"]["code"] == "internal"


def test_an_unknown_kind_is_the_root_class_and_a_non_envelope_is_refused() -> None:
    back = from_envelope({"code": "x", "kind": "Nope", "message": "m", "hint": None})
    assert type(back) is WaymarkError and back.hint is None
    with pytest.raises(KeyError):
        from_envelope({"code": "x", "message": "m"})
