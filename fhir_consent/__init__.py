"""fhir-consent: a FHIR R4 server with patient-controlled, ledger-backed access.

The public entry points, importable from the package itself:

* :func:`create_app` — the whole server as one ASGI app; it works on its own (``fhir-consent
  serve``) or mounted under a prefix of a host FastAPI/Starlette app (``docs/mounting.md``);
* :func:`mounted_lifespan` — the host app's ``lifespan`` that runs the mounted app's;
* :func:`create_core_app` — the FHIR API and the authorization server alone.

They are loaded on first use (PEP 562), so importing a pure module such as
:mod:`fhir_consent.consent.rules` pulls in no web framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app", "create_core_app", "mounted_lifespan"]

if TYPE_CHECKING:
    from fhir_consent.app import create_app, create_core_app, mounted_lifespan


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fhir_consent import app

        return getattr(app, name)
    raise AttributeError(f"module 'fhir_consent' has no attribute {name!r}")
