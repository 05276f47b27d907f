"""Passwords (argon2id, ``argon2-cffi``), API tokens and session ids.

A password is kept only as an argon2id hash (the library's defaults, RFC 9106's low-memory
profile). Tokens and session ids are 256 random bits, so their sha256 is kept: a slow hash
defends guessable secrets, and these are not guessable. Comparisons are constant-time.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from waymark.errors import InvalidInput


@functools.cache
def _hasher() -> PasswordHasher:
    return PasswordHasher()

MIN_PASSWORD = 8
TOKEN_PREFIX = "wm_"


def check_password_rules(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"a password needs at least {MIN_PASSWORD} characters.",
                           hint="Choose a longer one (a passphrase is best).")
    return password


def hash_password(password: str) -> str:
    return _hasher().hash(check_password_rules(password))


def password_matches(stored_hash: str, password: str) -> bool:
    try:
        return _hasher().verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def dummy_hash() -> str:
    """A hash to verify against when the user does not exist, so a wrong name costs as long as
    a wrong password (no user enumeration by timing)."""
    return _hasher().hash("waymark-no-such-user")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def new_token() -> tuple[str, str, str]:
    """(token id, secret, the token as given to the user: ``wm_<id>_<secret>``)."""
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    return token_id, secret, f"{TOKEN_PREFIX}{token_id}_{secret}"


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = token[len(TOKEN_PREFIX):].partition("_")
    return (token_id, secret) if sep and token_id and secret else None


def new_session() -> tuple[str, str]:
    """(the cookie value, its CSRF token)."""
    return secrets.token_urlsafe(32), secrets.token_urlsafe(32)
