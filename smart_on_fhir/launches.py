"""EHR launch contexts (SMART App Launch 2.2 app-launch.md §"EHR Launch").

An administrator (``fhir-consent launch create``) or the EHR itself records a context: the
patient (and encounter) open in the EHR, optionally bound to one app and one user. The app
is opened at its launch URL with ``iss`` (the FHIR base) and ``launch`` (the context id,
opaque and unguessable); the authorize request carries ``launch`` back and the server binds
the context to the authorization.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import urlencode

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .errors import SmartError
from .tables import launch_contexts

__all__ = ["LaunchContext", "LaunchError", "create_launch", "get_launch", "launch_url"]


class LaunchError(SmartError, ValueError):
    """A launch context could not be created."""


@dataclass(frozen=True, slots=True)
class LaunchContext:
    """What the EHR had open when it launched the app."""

    id: str
    patient: str | None
    encounter: str | None
    client_id: str | None
    user_id: str | None
    need_patient_banner: bool
    intent: str | None
    expires_at: int


def create_launch(
    conn: Connection,
    *,
    now: int,
    patient: str | None,
    encounter: str | None = None,
    client_id: str | None = None,
    user_id: str | None = None,
    need_patient_banner: bool = True,
    intent: str | None = None,
    lifetime: int = 3600,
) -> LaunchContext:
    """Record a launch context valid for *lifetime* seconds and return it."""
    if patient is None and encounter is None:
        raise LaunchError("a launch context needs a patient or an encounter")
    context = LaunchContext(
        secrets.token_urlsafe(24),
        patient,
        encounter,
        client_id,
        user_id,
        need_patient_banner,
        intent,
        now + lifetime,
    )
    conn.execute(
        launch_contexts.insert().values(
            id=context.id,
            patient=patient,
            encounter=encounter,
            client_id=client_id,
            user_id=user_id,
            need_patient_banner=need_patient_banner,
            intent=intent,
            created_at=now,
            expires_at=context.expires_at,
        )
    )
    return context


def get_launch(conn: Connection, launch_id: str, *, now: int) -> LaunchContext | None:
    """The unexpired context with this id, or ``None``."""
    if not isinstance(launch_id, str) or len(launch_id) > 64:
        return None
    row = conn.execute(
        sa.select(
            launch_contexts.c.id,
            launch_contexts.c.patient,
            launch_contexts.c.encounter,
            launch_contexts.c.client_id,
            launch_contexts.c.user_id,
            launch_contexts.c.need_patient_banner,
            launch_contexts.c.intent,
            launch_contexts.c.expires_at,
        ).where(launch_contexts.c.id == launch_id, launch_contexts.c.expires_at > now)
    ).first()
    if row is None:
        return None
    return LaunchContext(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], int(row[7]))


def launch_url(launch_uri: str, *, iss: str, launch: str) -> str:
    """The URL the EHR opens: the app's launch URI with ``iss`` and ``launch``."""
    separator = "&" if "?" in launch_uri else "?"
    return f"{launch_uri}{separator}{urlencode({'iss': iss, 'launch': launch})}"
