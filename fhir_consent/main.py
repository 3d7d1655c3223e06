"""ASGI entry point for uvicorn workers: ``uvicorn fhir_consent.main:app``.

Settings come from the environment; importing this module builds the app (this is the one
module whose purpose is to do that).
"""

from fhir_consent.app import create_app

app = create_app()
