"""``audit.audit_index`` (the audit trail's own index builder) gives exactly the rows the
generic extraction (``searchparams.extract``) finds in the same AuditEvent, in the same
order, for every shape ``audit.audit_event`` produces: who called (patient, clinician,
related person, clinic system, open access), on whose behalf, which resources, which
Consents decided, searches, refusals, purposes of use and odd references."""

from __future__ import annotations

from dataclasses import replace

from fhir.resources.R4B.auditevent import AuditEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_consent.audit import (
    AuditRecord,
    access_count,
    audit_event,
    audit_index,
    coalesce,
    prepare_audit,
)
from fhir_consent.auth import OPEN_ACCESS, AccessContext
from fhir_consent.fhir import searchparams
from fhir_consent.fhir.services import finalize
from smart_on_fhir.scopes import parse_scopes

_IDS = st.sampled_from(["p1", "a-2", "x.y", "Z9"])
_REFS = st.one_of(
    st.builds(lambda t, i: f"{t}/{i}", st.sampled_from(["Patient", "DocumentReference"]), _IDS),
    st.builds(lambda i: f"Consent/{i}/_history/3", _IDS),
    st.sampled_from(
        ["urn:uuid:0b7c3a5e-1f7e-4b8e-9a55-3f1f7e0e6a11", "#contained", "", "Binary/b1"]
    ),
    st.builds(lambda i: f"https://other.example/fhir/Patient/{i}", _IDS),
)
_ACCESS = st.one_of(
    st.just(OPEN_ACCESS),
    st.builds(
        AccessContext,
        scopes=st.just(parse_scopes("patient/*.rs")),
        subject=st.one_of(st.none(), _IDS),
        client_id=st.one_of(st.none(), st.sampled_from(["app", "ehr-1"])),
        patient=st.one_of(st.none(), _IDS),
        fhir_user=st.one_of(
            st.none(),
            st.builds(
                lambda t, i: f"{t}/{i}",
                st.sampled_from(["Patient", "Practitioner", "RelatedPerson"]),
                _IDS,
            ),
        ),
        client_organization=st.one_of(st.none(), st.builds(lambda i: f"Organization/{i}", _IDS)),
        purpose_of_use=st.frozensets(st.sampled_from(["TREAT", "ETREAT", "HPAYMT"]), max_size=2),
    ),
)
_RECORDS = st.builds(
    AuditRecord,
    interaction=st.sampled_from(
        ["read", "vread", "search-type", "create", "update", "delete", "operation", "x-other"]
    ),
    recorded=st.integers(min_value=0, max_value=4_102_444_800_000_000),
    permitted=st.booleans(),
    access=_ACCESS,
    entities=st.lists(_REFS, max_size=4),
    patient=st.one_of(st.none(), st.builds(lambda i: f"Patient/{i}", _IDS)),
    decided_by=st.lists(st.builds(lambda i: f"Consent/{i}", _IDS), max_size=2),
    reason=st.one_of(st.none(), st.sampled_from(["consent-explicit", "patient-self"])),
    query=st.one_of(st.none(), st.sampled_from(["DocumentReference?patient&date", ""])),
    on_behalf_of=st.lists(_REFS, max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(_RECORDS)
def test_same_rows_as_the_generic_extraction(record: AuditRecord) -> None:
    _content, parsed = finalize(audit_event(record), "e1", 1, record.recorded)
    assert audit_index(parsed) == searchparams.extract(parsed)


@settings(max_examples=150, deadline=None)
@given(_RECORDS, st.integers(min_value=2, max_value=50), st.integers(min_value=0, max_value=10**6))
def test_coalesced_events_are_valid_and_indexed_alike(
    record: AuditRecord, repeats: int, spread: int
) -> None:
    """Repeats of one access become one AuditEvent that R4B validates, with the access count
    and the period, and with the same index rows as the generic extraction."""
    times = [record.recorded + spread * i // repeats for i in range(repeats)]
    merged = coalesce([replace(record, recorded=t) for t in reversed(times)])
    single = audit_event(record)
    assert access_count(single) == 1 and "period" not in single
    if not (record.patient or record.entities or record.query):
        assert len(merged) == repeats  # nothing in the AuditEvent could carry the count
        assert len(coalesce([record] * repeats)) == repeats  # the same object queued again too
        return
    (one,) = merged
    assert (one.occurrences, one.first, one.recorded) == (repeats, times[0], times[-1])
    _content, parsed = finalize(audit_event(one), "e1", 1, one.recorded)
    assert audit_index(parsed) == searchparams.extract(parsed)
    assert access_count(parsed) == repeats
    assert parsed["period"]["end"] == parsed["recorded"]
    assert _valid(parsed) == _valid(finalize(single, "e1", 1, record.recorded)[1])


def _valid(event: dict[str, object]) -> bool:
    """R4B's verdict (the generator makes odd references, such as empty ones, on purpose)."""
    try:
        AuditEvent.model_validate(event)
    except ValueError:
        return False
    return True


def test_prepared_audit_events_carry_them() -> None:
    access = AccessContext(
        scopes=parse_scopes("patient/*.rs"), client_id="app", fhir_user="Patient/p1"
    )
    record = AuditRecord("read", 1_700_000_000_000_000, True, access, ("Patient/p1",), "Patient/p1")
    _rid, _content, _now, index = prepare_audit(record)
    refs = {(r.param, r.target_type, r.target_id) for r in index.references}
    assert refs == {
        ("agent", "Patient", "p1"),
        ("entity", "Patient", "p1"),
        ("patient", "Patient", "p1"),
    }
    assert [d.param for d in index.dates] == ["date"]
