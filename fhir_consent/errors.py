"""One exception tree for the FHIR API; each error renders as an OperationOutcome.

    FHIRError (status, issue code)
    ├── BadRequest            400  invalid / structure / value / processing
    │   └── InvalidResource   400  validation failure with FHIRPath expressions
    ├── Unauthorized          401
    ├── Forbidden             403
    ├── NotFound              404  unknown type or id
    ├── MethodNotAllowed      405
    ├── NotAcceptable         406
    ├── Conflict              409
    ├── Gone                  410  deleted resource
    ├── PreconditionFailed    412  If-Match / If-None-Exist mismatch
    ├── PayloadTooLarge       413
    ├── UnsupportedMediaType  415
    └── Unprocessable         422  business rule

Messages are written by us, never ``str(exc)`` of a library error, and never contain resource
content: they are safe to log and to return (FHIR R4 http.html §3.1.0.4, operationoutcome.html).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = [
    "BadRequest",
    "Conflict",
    "FHIRError",
    "Forbidden",
    "Gone",
    "InvalidResource",
    "Issue",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
    "operation_outcome",
]


class Issue:
    """One OperationOutcome.issue."""

    __slots__ = ("code", "diagnostics", "expression", "severity")

    def __init__(
        self,
        diagnostics: str,
        code: str = "invalid",
        severity: str = "error",
        expression: Sequence[str] = (),
    ) -> None:
        self.diagnostics = diagnostics
        self.code = code
        self.severity = severity
        self.expression = tuple(expression)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            out["expression"] = list(self.expression)
        return out


def operation_outcome(issues: Sequence[Issue]) -> dict[str, Any]:
    """An OperationOutcome resource with the given issues."""
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


class FHIRError(Exception):
    """Root of the FHIR API errors. ``status`` is the HTTP status."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "exception"

    def __init__(
        self,
        diagnostics: str,
        *,
        issues: Sequence[Issue] | None = None,
        headers: dict[str, str] | None = None,
        hidden: Any = None,
    ) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.issues: list[Issue] = list(issues) if issues else [Issue(diagnostics, self.code)]
        self.headers = headers or {}
        #: a stored row the caller was refused (answered like a missing one): audited, never
        #: shown to the caller
        self.hidden = hidden

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


class BadRequest(FHIRError):
    status = 400
    code = "invalid"


class InvalidResource(BadRequest):
    """The body is not a valid FHIR resource; issues carry FHIRPath ``expression``s."""

    code = "structure"


class Unauthorized(FHIRError):
    status = 401
    code = "login"


class Forbidden(FHIRError):
    status = 403
    code = "forbidden"


class NotFound(FHIRError):
    status = 404
    code = "not-found"


class MethodNotAllowed(FHIRError):
    status = 405
    code = "not-supported"


class NotAcceptable(FHIRError):
    status = 406
    code = "not-supported"


class Conflict(FHIRError):
    status = 409
    code = "conflict"


class Gone(FHIRError):
    status = 410
    code = "deleted"


class PreconditionFailed(FHIRError):
    status = 412
    code = "conflict"


class PayloadTooLarge(FHIRError):
    status = 413
    code = "too-costly"


class UnsupportedMediaType(FHIRError):
    status = 415
    code = "not-supported"


class Unprocessable(FHIRError):
    status = 422
    code = "business-rule"
