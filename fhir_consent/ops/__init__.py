"""Operations: structured logs with request ids and no patient data, liveness and readiness,
Prometheus metrics, backup and restore (docs/operations.md).

``install(app)`` (called by :func:`fhir_consent.app.create_app`) wires the HTTP side
(:mod:`.wiring`); ``fhir-consent serve`` configures logging (:mod:`.logs`) and multiprocess
metrics (:mod:`.metrics`); ``fhir-consent backup`` is :mod:`.backup`.
"""

from fhir_consent.ops.logs import configure_logging, logging_config, request_id
from fhir_consent.ops.routing import route_template
from fhir_consent.ops.wiring import Ops, install

__all__ = ["Ops", "configure_logging", "install", "logging_config", "request_id", "route_template"]
