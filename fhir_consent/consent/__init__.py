"""Patient-controlled access (consent.md).

This package exports the pure decision engine (§1, §3, §5). The layers around it are imported
from their modules, so that importing the engine pulls in no database or web code:

* :mod:`.sql` — one request's decision compiled into SQL over the search index (§4);
* :mod:`.enforcement` — the ``ConsentEnforcer`` behind ``FHIRContext.consent`` (§1, §4);
* :mod:`.workflow` — the inquiry workflow (§2) and ``install(ctx, settings)``;
* :mod:`.index`, :mod:`.tables` — the consent index kept in step with every Consent write;
* :mod:`.auditing` — the audit sink that names the deciding Consents (§6);
* :mod:`.config` — ``ConsentSettings`` (break-glass).
"""

from fhir_consent.consent.rules import (
    ACTCODE_SYSTEM,
    BREAK_GLASS_PURPOSE,
    CONFIDENTIALITY_SYSTEM,
    CONSENT_ACTION_SYSTEM,
    LEGAL_REPRESENTATIVE_CODES,
    MIME_SYSTEM,
    RESOURCE_TYPES_SYSTEM,
    ROLECODE_SYSTEM,
    AccessDecision,
    AccessRequest,
    CompiledConsent,
    ConsentResult,
    ConsentSet,
    Decision,
    Reason,
    Ref,
    ResourceFacts,
    compile_consent,
    decide,
    evaluate_consent,
    facts_from_resource,
    is_legal_representative,
    normalize_reference,
)

__all__ = [
    "ACTCODE_SYSTEM",
    "BREAK_GLASS_PURPOSE",
    "CONFIDENTIALITY_SYSTEM",
    "CONSENT_ACTION_SYSTEM",
    "LEGAL_REPRESENTATIVE_CODES",
    "MIME_SYSTEM",
    "RESOURCE_TYPES_SYSTEM",
    "ROLECODE_SYSTEM",
    "AccessDecision",
    "AccessRequest",
    "CompiledConsent",
    "ConsentResult",
    "ConsentSet",
    "Decision",
    "Reason",
    "Ref",
    "ResourceFacts",
    "compile_consent",
    "decide",
    "evaluate_consent",
    "facts_from_resource",
    "is_legal_representative",
    "normalize_reference",
]
