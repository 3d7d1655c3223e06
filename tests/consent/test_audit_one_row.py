"""The audit of a one-row access (every read, vread and refused read) takes a short path in
``ConsentAuditSink``: it must queue exactly the record the general, per-patient grouping
makes of that row, whatever the consent explanation says, and a break-glass access must still
be stored before the response leaves."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fhir_consent.audit import AuditRecord
from fhir_consent.auth import AccessContext
from fhir_consent.consent.auditing import ConsentAuditSink
from fhir_consent.consent.enforcement import Explanation
from fhir_consent.store.repository import CurrentRow
from smart_on_fhir.scopes import parse_scopes

ACCESS = AccessContext(
    scopes=parse_scopes("user/*.rs"),
    subject="u1",
    client_id="clinic-app",
    fhir_user="Practitioner/dr",
    jti="j1",
)


def _row(res_type: str, res_id: str, content: dict[str, Any] | None) -> CurrentRow:
    body = None if content is None else orjson.dumps({"resourceType": res_type, **content})
    return CurrentRow(7, res_type, res_id, 2, 1_700_000_000_000_000, False, body)


class _Filter:
    """A request's consent filter that explains every row as it is told to."""

    def __init__(self, explanation: Explanation | None) -> None:
        self.explanation = explanation

    def explain(self, _row: Any) -> Explanation | None:
        return self.explanation


class _Collecting(ConsentAuditSink):
    """Keeps what it is given instead of queueing or storing it."""

    def __init__(self) -> None:
        self.queued: list[AuditRecord] = []
        self.stored_now: list[AuditRecord] = []

    def record(self, record: AuditRecord) -> None:
        self.queued.append(record)

    def record_now(self, record: AuditRecord) -> None:
        self.stored_now.append(record)


DOC = _row("DocumentReference", "d1", {"subject": {"reference": "Patient/p1"}})
CASES = [
    (
        _row("Patient", "p1", {}),
        Explanation(True, "patient-self", patient="Patient/p1"),
        True,
        None,
    ),
    (
        DOC,
        Explanation(True, "consent-explicit", ("Consent/b/_history/1", "Consent/a/_history/2")),
        True,
        None,
    ),
    (DOC, Explanation(False, "default-deny"), False, "not permitted"),  # a refusal, explained
    (DOC, Explanation(True, "consent-explicit"), False, "not permitted"),  # explained otherwise
    (DOC, None, True, None),  # nothing to explain: the row names its patient
    (_row("Organization", "o1", {"name": "Clinic"}), None, True, None),  # not patient data
    (_row("Binary", "b1", None), None, False, "not permitted"),
    (DOC, Explanation(True, "break-glass", ("Consent/a/_history/2",)), True, None),
    (_row("AuditEvent", "a1", {}), None, True, None),  # AuditEvents are not audited
]


@pytest.mark.parametrize(("row", "explanation", "permitted", "reason"), CASES)
@pytest.mark.parametrize("interaction", ["read", "vread"])
@pytest.mark.parametrize("query", [None, "DocumentReference?patient"])
def test_one_row_is_recorded_as_the_grouping_records_it(
    row: CurrentRow,
    explanation: Explanation | None,
    permitted: bool,
    reason: str | None,
    interaction: str,
    query: str | None,
) -> None:
    flt: Any = _Filter(explanation)
    short, grouped = _Collecting(), _Collecting()
    args = (interaction, ACCESS, row, 1_764_770_000_000_000, permitted, reason, query)
    short._record_one(flt, *args)
    grouped._record_groups(flt, args[0], args[1], [row], *args[3:])
    assert (short.queued, short.stored_now) == (grouped.queued, grouped.stored_now)
    if row.res_type == "AuditEvent" and query is None:
        assert short.queued == short.stored_now == []
    else:
        assert len(short.queued) + len(short.stored_now) == 1
    if explanation is not None and explanation.reason == "break-glass":
        assert short.queued == [] and len(short.stored_now) == 1  # stored before the response
