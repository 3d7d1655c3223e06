"""The write path of the permissions ledger: one entry per Consent and DocumentReference version,
appended in the FHIR write's own transaction (ledger.md §1, §2 "Atomic with the change").

:class:`LedgerListener` is a :class:`fhir_consent.fhir.services.WriteListener`. The FHIR
service calls it after storing each version and before the transaction commits; if it raises,
the whole write rolls back, so a change without its entry (or an entry without its change) is
impossible. It appends the entry to the embedded log (allocating the gap-free ``seq``, adding
the leaf to the Merkle tree) and, when an external engine is configured, an outbox row the
relay later anchors.

Who made the change travels only inside the sealed box (ledger.md §1): :data:`current_actor`
when a caller set it explicitly, otherwise the request's caller (:data:`fhir_consent.
requestctx.current_access`, set by the FHIR routes once the token is verified) —
its ``fhirUser`` (``"Practitioner/123"``), else its client (``"client:my-app"``, plus the
Organization a clinic system is bound to), else ``"open-access"`` for the development mode.
Starlette's ``run_in_threadpool`` copies the context, so setting it in the request task is
enough.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from sqlalchemy.engine import Connection

from fhir_consent.crypto import (
    ENV_PSEUDONYM_SECRET,
    ENV_RETIRED_PSEUDONYM_SECRETS,
    ENV_RETIRED_RMS_PRIVATE_KEYS,
    ENV_RETIRED_RMS_PUBLIC_KEYS,
    ENV_RETIRED_SIGNING_KEYS,
    ENV_RMS_PRIVATE_KEY,
    ENV_RMS_PUBLIC_KEY,
    ENV_SIGNING_KEY,
    KeyRing,
    KeyRingError,
)
from fhir_consent.fhir.services import WriteEvent
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.ledger.embedded import EmbeddedLog, NewEntry
from fhir_consent.ledger.engines.base import EMBEDDED
from fhir_consent.ledger.entry import KINDS, event_for_consent
from fhir_consent.requestctx import current_access

__all__ = [
    "NO_SUBJECT",
    "Ledger",
    "LedgerListener",
    "actor_of_request",
    "build_ledger",
    "current_actor",
    "load_keyring",
    "new_entry_for",
    "patient_reference",
]

log = logging.getLogger("fhir_consent.ledger")

#: Who is making the current change; set per request by the FHIR layer (default "unknown").
current_actor: ContextVar[str] = ContextVar("fhir_consent_ledger_actor", default="unknown")

#: Pseudonymised in place of the patient when a version names none (Consent.patient is 0..1).
NO_SUBJECT: Final = "urn:fhir-consent:no-subject"

_REF_TAIL = re.compile(r"(?:^|/)([A-Za-z]{1,64}/[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?/?$")


def actor_of_request() -> str:
    """Who is making the current change (see the module docstring)."""
    explicit = current_actor.get()
    if explicit != "unknown":
        return explicit
    access = current_access.get()
    if access.fhir_user:
        return access.fhir_user
    if access.client_id:
        org = f" ({access.client_organization})" if access.client_organization else ""
        return f"client:{access.client_id}{org}"
    return "open-access" if access.is_open else "unknown"


def patient_reference(resource: dict[str, Any] | None) -> str:
    """The relative patient reference of a Consent (``patient``) or DocumentReference
    (``subject``), e.g. ``Patient/123``; absolute URLs are reduced to ``Type/id`` so the
    same patient always gets the same pseudonym (ledger.md §1 ``subject``)."""
    if not resource:
        return NO_SUBJECT
    element = "patient" if resource.get("resourceType") == "Consent" else "subject"
    ref = resource.get(element)
    text = ref.get("reference") if isinstance(ref, dict) else None
    if not isinstance(text, str) or not text:
        return NO_SUBJECT
    m = _REF_TAIL.search(text)
    return m.group(1) if m else text


def _status(resource: dict[str, Any] | None) -> str | None:
    status = resource.get("status") if resource else None
    return status if isinstance(status, str) else None


def new_entry_for(event: WriteEvent, actor: str) -> NewEntry | None:
    """The entry to append for one stored version, or None for other resource types."""
    row = event.current
    if row.res_type not in KINDS:
        return None
    previous: dict[str, Any] | None = None
    if event.previous is not None and not event.previous.deleted and event.previous.content:
        previous = orjson.loads(event.previous.content)
    current: dict[str, Any] | None = None
    if not row.deleted:
        current = dict(event.resource) if event.resource is not None else None
        if current is None and row.content is not None:
            current = orjson.loads(row.content)
    if row.res_type == "Consent":
        try:
            ev = event_for_consent(_status(previous), _status(current), row.deleted)
        except ValueError:  # a status this version of the mapping does not know
            ev = "created" if previous is None else "updated"
    else:
        ev = "deleted" if row.deleted else ("created" if previous is None else "updated")
    return NewEntry(
        kind=row.res_type,
        ref=f"{row.res_type}/{row.res_id}/_history/{row.version_id}",
        event=ev,
        patient_ref=patient_reference(current if current is not None else previous),
        resource=None if row.deleted else row.content,
        actor=actor or "unknown",
        ts_us=row.last_updated,
    )


class LedgerListener:
    """The :class:`~fhir_consent.fhir.services.WriteListener` that writes ledger entries."""

    __slots__ = ("log",)

    def __init__(self, log: EmbeddedLog) -> None:
        self.log = log

    def __call__(self, conn: Connection, event: WriteEvent) -> None:
        item = new_entry_for(event, actor_of_request())
        if item is not None:
            self.log.append(conn, [item])


_KEY_VARIABLES: Final = (
    ENV_SIGNING_KEY,
    ENV_RETIRED_SIGNING_KEYS,
    ENV_RMS_PUBLIC_KEY,
    ENV_RMS_PRIVATE_KEY,
    ENV_PSEUDONYM_SECRET,
    ENV_RETIRED_RMS_PUBLIC_KEYS,
    ENV_RETIRED_RMS_PRIVATE_KEYS,
    ENV_RETIRED_PSEUDONYM_SECRETS,
)


def _with_secret_files(environ: dict[str, str]) -> dict[str, str]:
    """``<VARIABLE>_FILE`` (Docker/Kubernetes secret files) supplies ``<VARIABLE>``."""
    out = dict(environ)
    for name in _KEY_VARIABLES:
        path = environ.get(f"{name}_FILE")
        if path and not environ.get(name):
            try:
                out[name] = Path(path).read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError):
                raise KeyRingError(f"cannot read the secret file named by {name}_FILE") from None
    return out


def load_keyring(settings: LedgerSettings, env: dict[str, str] | None = None) -> KeyRing:
    """The ledger's key ring: from the environment when ``FHIR_CONSENT_SIGNING_KEY`` (or
    ``FHIR_CONSENT_SIGNING_KEY_FILE``, a secret file; likewise for every key variable) is set,
    else from ``settings.keys_dir`` — created there first when ``auto_init_keys`` allows.

    Raises :class:`~fhir_consent.crypto.KeyRingError` (messages name files and variables,
    never key material).
    """
    environ = _with_secret_files(dict(os.environ) if env is None else env)
    if environ.get(ENV_SIGNING_KEY):
        return KeyRing.from_env(environ)
    directory = Path(settings.keys_dir)
    if not (directory / "signing.key").exists() and settings.auto_init_keys:
        try:
            KeyRing.generate(directory)
            log.warning("created a new ledger key ring in %s (keys init)", directory)
        except KeyRingError:
            pass  # another worker is creating it: load below
    deadline = time.monotonic() + 5
    while True:
        try:
            return KeyRing.load(directory)
        except KeyRingError:
            if not settings.auto_init_keys or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass(slots=True)
class Ledger:
    """Everything the ledger needs at run time (built once per process)."""

    settings: LedgerSettings
    keyring: KeyRing
    origin: str
    log: EmbeddedLog
    listener: LedgerListener


def build_ledger(
    settings: LedgerSettings,
    *,
    clock: Any,
    public_base_url: str | None = None,
    keyring: KeyRing | None = None,
) -> Ledger:
    """Load keys and wire the embedded log and the write listener."""
    ring = keyring if keyring is not None else load_keyring(settings)
    origin = settings.resolved_origin(public_base_url)
    embedded = EmbeddedLog(ring, origin, clock=clock, outbox=settings.engine != EMBEDDED)
    return Ledger(settings, ring, origin, embedded, LedgerListener(embedded))
