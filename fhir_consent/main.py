"""ASGI entry point for uvicorn workers: ``uvicorn fhir_consent.main:app``.

Settings come from the environment; importing this module builds the app (this is the one
module whose purpose is to do that). With ``FHIR_CONSENT_GATEWAY_UPSTREAM`` set it is the
gateway (``fhir-consent serve --upstream URL``, docs/gateway.md).
"""

from fhir_consent.app import create_app, freeze_heap_after_startup
from fhir_consent.gateway.config import GatewaySettings

_gateway = GatewaySettings()
if _gateway.upstream:
    from fhir_consent.gateway import create_gateway_app

    app = create_gateway_app(gateway=_gateway)
else:
    app = create_app()
freeze_heap_after_startup(app)
