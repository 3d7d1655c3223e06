"""The audit trail with the consent decision in it (consent.md §6: "which Consent decided it").

:class:`ConsentAuditSink` is a drop-in :class:`~fhir_consent.audit.AuditSink`: each read or
search AuditEvent names, per patient, the deciding Consent versions (``entity`` with role
*Security Resource*) and the reason (``outcomeDesc``: ``consent-explicit``, ``custodian``,
``patient-self``, ``break-glass``, …), from the request's own consent filter. Break-glass
accesses are not queued: their AuditEvent is written before the response leaves, so the patient
sees it at once (consent.md §3). A search that names a patient (``patient=``/``subject=``) is
logged for that patient even when it disclosed nothing of theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

from fhir_consent.audit import MAX_ENTITIES, AuditRecord, AuditSink, patient_of
from fhir_consent.auth import AccessContext
from fhir_consent.consent.enforcement import (
    Explanation,
    RequestFilter,
    current_filter,
    search_patients,
)
from fhir_consent.store.repository import CurrentRow, VersionRow

__all__ = ["ConsentAuditSink"]


class _Group:
    __slots__ = ("break_glass", "deciding", "permitted", "reasons", "refs")

    def __init__(self) -> None:
        self.refs: list[str] = []
        self.deciding: set[str] = set()
        self.reasons: set[str] = set()
        self.break_glass = False
        self.permitted = True


def _patient(explanation: Explanation | None, row: CurrentRow | VersionRow) -> str | None:
    """The patient a row's AuditEvent is for: the consent decision's, else the row's own."""
    if explanation is not None and explanation.patient:
        return explanation.patient
    return patient_of(row.res_type, row.res_id, row.content)


class ConsentAuditSink(AuditSink):
    """:class:`AuditSink` whose read/search records carry the consent decision."""

    def record_access(
        self,
        interaction: str,
        access: AccessContext,
        rows: Sequence[CurrentRow | VersionRow],
        recorded: int,
        *,
        permitted: bool = True,
        reason: str | None = None,
        query: str | None = None,
    ) -> None:
        """One AuditEvent per patient concerned, with the deciding Consents and reason."""
        flt = current_filter()
        if flt is None or access.is_open:
            super().record_access(
                interaction, access, rows, recorded, permitted=permitted, reason=reason, query=query
            )
            return
        if len(rows) == 1 and interaction != "search-type":
            self._record_one(flt, interaction, access, rows[0], recorded, permitted, reason, query)
        else:
            self._record_groups(flt, interaction, access, rows, recorded, permitted, reason, query)

    def _record_groups(
        self,
        flt: RequestFilter,
        interaction: str,
        access: AccessContext,
        rows: Sequence[CurrentRow | VersionRow],
        recorded: int,
        permitted: bool,
        reason: str | None,
        query: str | None,
    ) -> None:
        """:meth:`record_access` of any number of rows: one record per patient concerned."""
        groups: dict[str | None, _Group] = {}
        for row in rows:
            if row.res_type == "AuditEvent":
                continue
            explanation = flt.explain(row)
            group = groups.setdefault(_patient(explanation, row), _Group())
            group.refs.append(f"{row.res_type}/{row.res_id}")
            if explanation is not None:
                group.deciding.update(explanation.deciding)
                if permitted == explanation.permitted:
                    group.reasons.add(explanation.reason)
                group.break_glass |= explanation.reason == "break-glass"
        if interaction == "search-type":
            for named in search_patients():
                groups.setdefault(named, _Group())
        if not groups and query:
            groups[None] = _Group()
        for patient, group in groups.items():
            record = AuditRecord(
                interaction=interaction,
                recorded=recorded,
                permitted=permitted,
                access=access,
                entities=tuple(group.refs[:MAX_ENTITIES]),
                patient=patient,
                decided_by=tuple(sorted(group.deciding)),
                reason=",".join(sorted(group.reasons)) or reason,
                query=query,
            )
            if group.break_glass:
                self.record_now(record)  # before the response is sent
            else:
                self.record(record)

    def _record_one(
        self,
        flt: RequestFilter,
        interaction: str,
        access: AccessContext,
        row: CurrentRow | VersionRow,
        recorded: int,
        permitted: bool,
        reason: str | None,
        query: str | None,
    ) -> None:
        """:meth:`record_access` of one row (a read, a vread, a refusal): the record
        :meth:`_record_groups` makes of it, without the grouping (every audited read comes
        here)."""
        if row.res_type == "AuditEvent":
            if query:
                self.record(
                    AuditRecord(
                        interaction, recorded, permitted, access, reason=reason, query=query
                    )
                )
            return
        explanation = flt.explain(row)
        deciding: tuple[str, ...] = ()
        if explanation is not None:
            deciding = tuple(sorted(set(explanation.deciding)))
            if permitted == explanation.permitted:
                reason = explanation.reason or reason
        record = AuditRecord(
            interaction,
            recorded,
            permitted,
            access,
            entities=(f"{row.res_type}/{row.res_id}",),
            patient=_patient(explanation, row),
            decided_by=deciding,
            reason=reason,
            query=query,
        )
        if explanation is not None and explanation.reason == "break-glass":
            self.record_now(record)  # before the response is sent
        else:
            self.record(record)
