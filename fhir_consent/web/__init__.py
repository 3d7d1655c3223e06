"""The patient web app: a standard SMART standalone-launch app, served at ``/app``.

Plain ES modules (``static/js``), no build step and no third-party code. The app is a public
client with PKCE (S256) that talks only to the public FHIR API and the authorization server:

* **Inquiries** — proposed Consents (consent.md §2): who asked, for what, for how long and
  why; Grant (optionally narrowed: shorter period, fewer types) or Refuse; answered ones below.
* **Who can see my records** — active Consents with the time left, and Revoke.
* **My documents** — DocumentReferences; open or download their Binary content.
* **Access log** — AuditEvents about the patient, newest first, filterable.
* **Ledger** — every Consent version's ledger entry, verified in the browser with WebCrypto
  (Ed25519 signatures, RFC 9162 inclusion proof, the resource's SHA-256).

Live updates come from ``GET [base]/$events`` (:mod:`.events`), read with ``fetch()`` so the
token stays in the Authorization header. Wire it with
``install(app, app.state.fhir, WebSettings())`` (:mod:`.routes`).
"""

from fhir_consent.web.config import DEFAULT_CLIENT_ID, DEFAULT_SCOPE, WebSettings
from fhir_consent.web.events import EVENT_TYPES, EVENTS_PATH
from fhir_consent.web.routes import install

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_SCOPE",
    "EVENTS_PATH",
    "EVENT_TYPES",
    "WebSettings",
    "install",
]
