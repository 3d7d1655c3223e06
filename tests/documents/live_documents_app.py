"""``uvicorn live_documents_app:create --factory``: the application with the document store
installed, all settings from the environment (the slow tests' and the benchmark's server)."""

from __future__ import annotations

from fastapi import FastAPI

from fhir_consent.app import create_app
from fhir_consent.documents import DocumentSettings, install


def create() -> FastAPI:
    app = create_app()
    install(app, app.state.fhir, DocumentSettings())
    return app
