"""Keeping the consent index (:mod:`fhir_consent.consent.tables`) in step with the Consents.

:func:`analyze` digests one Consent version into its index row; :class:`ConsentIndexer` is the
WriteListener that rewrites the row in the transaction of every Consent write, so the index is
never behind the resources it describes (consent.md §2.3: revocation on the very next request).
:func:`rebuild` re-creates the index from the stored Consents (migrations, repairs).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fhir_consent.consent._compile import CompiledConsent, _Node, compile_consent
from fhir_consent.consent._types import Decision, Ref
from fhir_consent.consent.tables import (
    PARTY_ACTOR,
    PARTY_INQUIRER,
    consent_index,
    consent_party,
)
from fhir_consent.store.tables import resources

__all__ = [
    "INQUIRER_EXTENSION",
    "ConsentIndexer",
    "IndexEntry",
    "analyze",
    "inquirers_of",
    "rebuild",
]

#: consent.md §2.1: the server records on each inquiry who asked, from the token. R4 Consent has
#: no element for "who requested this Consent" (``performer`` is the grantor/grantee,
#: ``organization`` the custodian of the Consent), so it is an extension, one per reference,
#: set and preserved only by the server.
INQUIRER_EXTENSION: Final = "https://fhir-consent.dev/StructureDefinition/consent-requester"

_MAX_REF = 200


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One ``consent_index`` row and its ``consent_party`` rows."""

    patient_id: str | None
    status: str | None
    applicable: bool
    reach_all: bool
    actors: frozenset[Ref]
    inquirers: frozenset[Ref]


def _walk(node: _Node) -> Iterator[_Node]:
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children)


def _reaches_all(node: _Node, restricted: bool) -> bool:
    """Whether some permitting provision's path names no recipient (anyone may match it)."""
    restricted = restricted or node.recipients is not None
    if node.d is Decision.PERMIT and not restricted:
        return True
    return any(_reaches_all(child, restricted) for child in node.children)


def inquirers_of(consent: Mapping[str, Any]) -> frozenset[Ref]:
    """The requester references the server recorded on an inquiry (:data:`INQUIRER_EXTENSION`)."""
    out: set[Ref] = set()
    for ext in consent.get("extension") or ():
        if isinstance(ext, Mapping) and ext.get("url") == INQUIRER_EXTENSION:
            value = ext.get("valueReference")
            ref = value.get("reference") if isinstance(value, Mapping) else None
            if isinstance(ref, str) and ref:
                out.add(ref[:_MAX_REF])
    return frozenset(out)


def analyze(consent: Mapping[str, Any], compiled: CompiledConsent | None = None) -> IndexEntry:
    """The index entry of one Consent version (consent.md §3.1: only ``active`` and well-formed
    Consents apply; ``reach_all``: an OPTIN base permits anyone its root does not match)."""
    c = compiled if compiled is not None else compile_consent(consent)
    root = c._root
    actors: set[Ref] = set()
    if root is not None:
        for n in _walk(root):
            actors |= n.actor_refs
    reach_all = c.applicable and (
        c.base is Decision.PERMIT or (root is not None and _reaches_all(root, False))
    )
    patient = c.patient
    return IndexEntry(
        patient_id=patient[len("Patient/") :]
        if patient and patient.startswith("Patient/")
        else None,
        status=c.status[:32] if c.status else None,
        applicable=c.applicable,
        reach_all=reach_all,
        actors=frozenset(a[:_MAX_REF] for a in actors),
        inquirers=inquirers_of(consent),
    )


def _write(conn: Connection, pk: int, cid: str, version: int, entry: IndexEntry) -> None:
    conn.execute(consent_party.delete().where(consent_party.c.resource_pk == pk))
    conn.execute(consent_index.delete().where(consent_index.c.resource_pk == pk))
    conn.execute(
        consent_index.insert().values(
            resource_pk=pk,
            consent_id=cid,
            version_id=version,
            patient_id=entry.patient_id,
            status=entry.status,
            applicable=entry.applicable,
            reach_all=entry.reach_all,
        )
    )
    parties = [{"resource_pk": pk, "kind": PARTY_ACTOR, "ref": r} for r in sorted(entry.actors)]
    parties += [
        {"resource_pk": pk, "kind": PARTY_INQUIRER, "ref": r} for r in sorted(entry.inquirers)
    ]
    if parties:
        conn.execute(consent_party.insert(), parties)


def _forget(conn: Connection, pk: int) -> None:
    conn.execute(consent_party.delete().where(consent_party.c.resource_pk == pk))
    conn.execute(consent_index.delete().where(consent_index.c.resource_pk == pk))


class ConsentIndexer:
    """WriteListener: every Consent create/update/patch/delete rewrites its index row in the
    same transaction (``fhir_consent.fhir.services.WriteListener``)."""

    def __call__(self, conn: Connection, event: Any) -> None:
        row = event.current
        if row.res_type != "Consent":
            return
        if event.resource is None or row.deleted:
            _forget(conn, row.pk)
            return
        _write(conn, row.pk, row.res_id, row.version_id, analyze(event.resource))


def rebuild(conn: Connection) -> int:
    """Re-create the whole index from the current, undeleted Consents; returns their number."""
    conn.execute(consent_party.delete())
    conn.execute(consent_index.delete())
    r = resources.c
    rows = conn.execute(
        sa.select(r.pk, r.res_id, r.version_id, r.content).where(
            r.res_type == "Consent", r.deleted.is_(False)
        )
    ).all()
    n = 0
    for pk, rid, version, content in rows:
        data = content if isinstance(content, dict) else orjson.loads(content)
        _write(conn, pk, rid, version, analyze(data))
        n += 1
    return n
