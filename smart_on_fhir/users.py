"""User accounts: creation, argon2 passwords, timing-safe and rate-limited login.

Every function takes an open SQLAlchemy :class:`~sqlalchemy.engine.Connection` inside the
caller's transaction, and the time as an argument (no clock reads here).

* Passwords are hashed with argon2id (RFC 9106) through ``argon2-cffi``'s
  :class:`~argon2.PasswordHasher`; hashes are upgraded on login when the parameters change.
* :func:`authenticate` costs the same whether the user exists or not: an unknown or
  deactivated user is checked against a dummy hash (the full-stack-fastapi-template recipe).
* Failed logins are counted per (username, client IP) in the database, so the limit holds
  across workers; while the limit is reached the password is not even checked.

Messages never contain passwords or hashes.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.engine import Connection

from .errors import SmartError
from .tables import login_failures, users

__all__ = [
    "FHIR_USER_TYPES",
    "LoginResult",
    "User",
    "UserError",
    "authenticate",
    "create_user",
    "get_user",
    "get_user_by_name",
    "hash_password",
    "set_user_active",
]

#: Resource types a ``fhirUser`` may name (SMART 2.2 scopes-and-launch-context §fhirUser).
FHIR_USER_TYPES: Final = frozenset(
    {"Patient", "Practitioner", "PractitionerRole", "RelatedPerson", "Person"}
)
_FHIR_USER_RE: Final = re.compile(r"([A-Za-z]+)/([A-Za-z0-9\-.]{1,64})")
_USERNAME_RE: Final = re.compile(r"[A-Za-z0-9_.@+\-]{1,128}")
_MIN_PASSWORD: Final = 8


class UserError(SmartError, ValueError):
    """A user could not be created or changed (bad name, weak password, duplicate)."""


@dataclass(frozen=True, slots=True)
class User:
    """A login account. ``fhir_user`` is relative, e.g. ``"Patient/123"``."""

    id: str
    username: str
    fhir_user: str | None
    display_name: str | None
    active: bool

    @property
    def fhir_user_type(self) -> str | None:
        """``"Patient"``, ``"Practitioner"`` … or ``None``."""
        return self.fhir_user.split("/", 1)[0] if self.fhir_user else None


@dataclass(frozen=True, slots=True)
class LoginResult:
    """The outcome of :func:`authenticate`: ``user`` on success, else ``throttled`` says
    whether the attempt was refused by the rate limit."""

    user: User | None
    throttled: bool = False


@lru_cache(maxsize=1)
def _hasher() -> PasswordHasher:
    return PasswordHasher()


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher().hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """An argon2id hash of *password* (argon2-cffi defaults, RFC 9106 second choice)."""
    if len(password) < _MIN_PASSWORD:
        raise UserError(f"passwords need at least {_MIN_PASSWORD} characters")
    return _hasher().hash(password)


def _check_fhir_user(fhir_user: str | None) -> str | None:
    if fhir_user is None:
        return None
    match = _FHIR_USER_RE.fullmatch(fhir_user)
    if match is None or match[1] not in FHIR_USER_TYPES:
        raise UserError(
            "fhirUser must be Patient/<id>, Practitioner/<id>, PractitionerRole/<id>, "
            "RelatedPerson/<id> or Person/<id>"
        )
    return fhir_user


def _user(row: Any) -> User:
    return User(row[0], row[1], row[2], row[3], bool(row[4]))


_COLUMNS = (users.c.id, users.c.username, users.c.fhir_user, users.c.display_name, users.c.active)


def create_user(
    conn: Connection,
    username: str,
    password: str,
    *,
    fhir_user: str | None,
    now: int,
    display_name: str | None = None,
) -> User:
    """Create an active account.

    :param fhir_user: the FHIR resource this person is, e.g. ``Patient/123`` (checked for
        its shape here; the caller checks that it exists)
    :raises UserError: bad username, short password, bad ``fhir_user`` or a taken username
    """
    if not _USERNAME_RE.fullmatch(username):
        raise UserError("usernames are 1-128 letters, digits or _ . @ + -")
    checked = _check_fhir_user(fhir_user)
    digest = hash_password(password)
    if conn.execute(sa.select(users.c.id).where(users.c.username == username)).first():
        raise UserError(f"the username {username} is taken")
    user = User(secrets.token_hex(16), username, checked, display_name, True)
    conn.execute(
        users.insert().values(
            id=user.id,
            username=username,
            password_hash=digest,
            fhir_user=checked,
            display_name=display_name,
            active=True,
            created_at=now,
        )
    )
    return user


def get_user(conn: Connection, user_id: str) -> User | None:
    """The account with this id, active or not."""
    row = conn.execute(sa.select(*_COLUMNS).where(users.c.id == user_id)).first()
    return _user(row) if row is not None else None


def get_user_by_name(conn: Connection, username: str) -> User | None:
    """The account with this username, active or not."""
    row = conn.execute(sa.select(*_COLUMNS).where(users.c.username == username)).first()
    return _user(row) if row is not None else None


def set_user_active(conn: Connection, username: str, active: bool) -> bool:
    """Activate or deactivate an account; ``False`` if there is no such user.

    A deactivated user's tokens stop working at once: the resource server checks the
    user's state with every request (:func:`smart_on_fhir.protect.token_state`).
    """
    result = conn.execute(users.update().where(users.c.username == username).values(active=active))
    return bool(result.rowcount)


def _limit_key(username: str, client_ip: str) -> str:
    return hashlib.sha256(f"{username.casefold()}\x00{client_ip}".encode()).hexdigest()


def authenticate(
    conn: Connection,
    username: str,
    password: str,
    *,
    client_ip: str,
    now: int,
    max_failures: int,
    window: int,
) -> LoginResult:
    """Check a username and password, timing-safe and rate-limited.

    At most *max_failures* failures per (username, client IP) within *window* seconds;
    beyond that the attempt is refused without checking the password (OWASP ASVS 2.2.1).
    A success clears the failures of that key.
    """
    key = _limit_key(username, client_ip)
    since = now - window
    failures = conn.execute(
        sa.select(sa.func.count())
        .select_from(login_failures)
        .where(login_failures.c.key_hash == key, login_failures.c.at > since)
    ).scalar_one()
    if failures >= max_failures:
        return LoginResult(None, throttled=True)
    row = conn.execute(
        sa.select(*_COLUMNS, users.c.password_hash).where(users.c.username == username)
    ).first()
    user = _user(row) if row is not None else None
    stored = row[5] if row is not None else _dummy_hash()
    ok = _verify(stored, password) and user is not None and user.active
    if not ok:
        conn.execute(login_failures.delete().where(login_failures.c.at <= since))
        conn.execute(login_failures.insert().values(key_hash=key, at=now))
        return LoginResult(None)
    assert user is not None
    conn.execute(login_failures.delete().where(login_failures.c.key_hash == key))
    if _hasher().check_needs_rehash(stored):
        conn.execute(
            users.update()
            .where(users.c.id == user.id)
            .values(password_hash=_hasher().hash(password))
        )
    return LoginResult(user)


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher().verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False
