"""Which upstream resources a requester may see: the local server's rules, applied in Python.

The local server ANDs its visibility into SQL over its own search index; upstream resources are
not in that index, so each one is decided on its own, with the same parts:

1. the SMART scope (``search`` for the searched type, ``read`` for reads and included types);
2. the patient compartment of ``patient/`` tokens (:meth:`Visibility.can_write` is the Python
   form of the compartment predicate);
3. the consent decision: :meth:`RequestFilter.explain` — the consent engine's Python decision
   (``decide`` over the request's compiled Consents, the same inputs as its SQL, which the
   consent tests hold equal) — permit or not. Non-patient data (``explain`` → None) needs
   only the scope.

SMART v2 granular scope filters (``patient/DocumentReference.rs?category=…``) are SQL over our
index; they cannot be applied to an upstream resource, so a restricted scope sees nothing of
that type through the gateway (deny by default; see ``docs/gateway.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from fhir_consent.auth import AccessContext
from fhir_consent.consent.enforcement import RequestFilter
from fhir_consent.fhir import searchparams
from fhir_consent.fhir.validation import is_valid_id
from fhir_consent.fhir.visibility import PATIENT_COMPARTMENT, visibility_for
from fhir_consent.store.repository import CurrentRow
from smart_on_fhir.scopes import Interaction

__all__ = ["Decider", "Upstreamed", "as_row", "linked"]


@dataclass(frozen=True, slots=True)
class Upstreamed:
    """One resource from the upstream: parsed, and as bytes for the response."""

    resource: dict[str, Any]
    raw: bytes
    rtype: str
    rid: str
    #: the stored-row view the consent engine and the audit trail see (:func:`as_row`): one
    #: object per resource, so the decision and its audit record look at the same row
    row: CurrentRow = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "row", _row(self))

    @classmethod
    def parse(cls, value: Any, raw: bytes | None = None) -> Upstreamed | None:
        """From a parsed JSON value (None unless it is a resource with a valid id)."""
        if not isinstance(value, dict):
            return None
        rtype, rid = value.get("resourceType"), value.get("id")
        if not isinstance(rtype, str) or not isinstance(rid, str) or not is_valid_id(rid):
            return None
        return cls(value, raw if raw is not None else orjson.dumps(value), rtype, rid)

    @property
    def ref(self) -> str:
        return f"{self.rtype}/{self.rid}"

    @property
    def version(self) -> int:
        meta = self.resource.get("meta")
        vid = meta.get("versionId") if isinstance(meta, dict) else None
        return int(vid) if isinstance(vid, str) and vid.isdigit() and len(vid) < 12 else 1


def as_row(item: Upstreamed, *, deleted: bool = False) -> CurrentRow:
    """A stored-row view of an upstream resource, for the consent engine and the audit trail."""
    return _row(item, deleted=deleted) if deleted else item.row


def _row(item: Upstreamed, *, deleted: bool = False) -> CurrentRow:
    return CurrentRow(
        pk=0,
        res_type=item.rtype,
        res_id=item.rid,
        version_id=item.version,
        last_updated=0,
        deleted=deleted,
        content=None if deleted else item.raw,
    )


@dataclass(slots=True)
class Decider:
    """The visibility rules of one gateway request (see the module docstring)."""

    access: AccessContext
    now: int
    consent: RequestFilter | None
    forwarded: frozenset[str]
    primary: str | None = None  # the searched type (``search`` scope); others need ``read``
    _refused: list[CurrentRow] = field(default_factory=list)

    def permits(self, item: Upstreamed, interaction: Interaction | None = None) -> bool:
        """Whether the requester may see ``item``."""
        rtype = item.rtype
        if rtype not in self.forwarded:
            return False  # never hand out upstream copies of what lives in our store
        scopes = self.access.scopes
        if scopes is None:
            return False  # the gateway never runs open
        if interaction is None:
            interaction = Interaction.SEARCH if rtype == self.primary else Interaction.READ
        decision = scopes.decide(rtype, interaction)
        if not decision.allowed:
            return False
        vis = visibility_for(self.access, decision, rtype, self.now, self.consent)
        if vis.filters is not None:
            return False  # granular scope filters are SQL over our index: not applicable
        if vis.patient is not None and rtype in PATIENT_COMPARTMENT:
            if not vis.can_write(rtype, searchparams.extract(item.resource), item.rid):
                return False
        if self.consent is None:
            return False
        explanation = self.consent.explain(as_row(item))
        return explanation is None or explanation.permitted


def _targets(item: Upstreamed) -> set[str]:
    return {
        f"{r.target_type}/{r.target_id}"
        for r in searchparams.extract(item.resource).references
        if r.target_type and r.target_id
    }


def linked(served: Iterable[Upstreamed], candidates: Iterable[Upstreamed]) -> list[Upstreamed]:
    """The candidates (visible ``_include``/``_revinclude`` results) that are linked to a
    served resource by a reference either way, transitively (``:iterate``).

    An included resource is shown only because of a match we serve: one that an unserved
    (hidden) match pulled in would reveal that the hidden match exists."""
    kept: dict[str, Upstreamed] = {}
    refs: dict[str, set[str]] = {}
    frontier: list[Upstreamed] = list(served)
    known = {x.ref for x in frontier}
    pending: Mapping[str, Upstreamed] = {c.ref: c for c in candidates if c.ref not in known}
    remaining = dict(pending)
    while frontier and remaining:
        nxt: list[Upstreamed] = []
        for item in frontier:
            out = refs.setdefault(item.ref, _targets(item))
            for ref, cand in list(remaining.items()):
                back = refs.setdefault(ref, _targets(cand))
                if ref in out or item.ref in back:
                    kept[ref] = cand
                    del remaining[ref]
                    nxt.append(cand)
        frontier = nxt
    return [c for ref, c in pending.items() if ref in kept]
