"""A host application that mounts fhir-consent under a prefix (docs/mounting.md).

The hospital's own FastAPI app keeps its routes; fhir-consent lives under ``/ehr``: the FHIR
base is ``/ehr/fhir``, the SMART authorization server ``/ehr/auth``, the patient app
``/ehr/app/``. Every URL fhir-consent hands out follows the mount point.

Run it (settings come from the ``FHIR_CONSENT_*`` environment, as for ``fhir-consent serve``;
``EHR_MOUNT`` moves the mount point)::

    uvicorn host_app:build --factory --app-dir docs/examples --no-proxy-headers
    python docs/examples/host_app.py          # the same, on 127.0.0.1:8000

``--no-proxy-headers``: fhir-consent decides itself which proxies it trusts
(``FHIR_CONSENT_TRUSTED_PROXIES``); uvicorn's own handling would trust 127.0.0.1 silently.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from fhir_consent import create_app, mounted_lifespan
from fhir_consent.config import Settings


def build() -> FastAPI:
    """The host app with fhir-consent mounted at ``$EHR_MOUNT`` (default ``/ehr``)."""
    mount = os.environ.get("EHR_MOUNT", "/ehr").rstrip("/")
    fhir = create_app(Settings())
    # Starlette runs only the host's lifespan: this one also starts (and stops) fhir-consent's
    # migrations, audit writer and ledger relay.
    host = FastAPI(title="Hospital portal", lifespan=mounted_lifespan(fhir))

    @host.get("/")
    async def home() -> dict[str, str]:
        return {"service": "hospital portal", "fhir-consent": f"{mount}/"}

    host.mount(mount, fhir)
    return host


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(build, factory=True, host="127.0.0.1", port=8000, proxy_headers=False)
