"""Our whole server with false claims injected into its CapabilityStatement, for the tests
that prove the kit reports what is not true (``uvicorn broken_server:app``; the environment
configures the server as usual). ``CONFORMANCE_INJECT``:

* ``rest`` (default): Patient claims a ``marital-status`` search parameter the server does
  not index (it ignores unknown parameters, so the non-matching resource is found too) and
  conditional update (not implemented), and an Observation type the server does not store;
* ``consent``: the consent-enforcement marker, on a server with open access (which enforces
  nothing).
"""

from __future__ import annotations

import os
from typing import Any

from fhir_consent.app import create_app
from fhir_consent.fhir.capability import declare_consent_enforcement


def inject_rest(statement: dict[str, Any]) -> None:
    rest = statement["rest"][0]
    for resource in rest["resource"]:
        if resource["type"] == "Patient":
            bogus = {"name": "marital-status", "type": "token"}
            resource["searchParam"].append({**bogus, "documentation": "Patient.maritalStatus"})
            resource["conditionalUpdate"] = True
    rest["resource"].append(
        {
            "type": "Observation",
            "interaction": [{"code": "read"}, {"code": "create"}, {"code": "search-type"}],
            "searchParam": [{"name": "code", "type": "token", "documentation": "Observation.code"}],
        }
    )


app = create_app()
if os.environ.get("CONFORMANCE_INJECT", "rest") == "consent":
    app.state.fhir.capability_extenders.append(declare_consent_enforcement)
else:
    app.state.fhir.capability_extenders.append(inject_rest)
