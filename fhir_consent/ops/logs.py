"""Log lines without patient data, each tagged with the request it belongs to.

* :data:`request_id` holds the current request's id (set by
  :class:`fhir_consent.ops.middleware.OpsMiddleware`); Starlette copies the context into the
  worker threads that run a request's database work, so every line logged on behalf of a
  request carries its id.
* :class:`JsonFormatter` writes one JSON object per line (``ts``, ``level``, ``logger``,
  ``msg``, ``request_id`` and the structured fields of the access log); :class:`TextFormatter`
  the same as plain text.
* Neither ever writes an exception's *message*: library messages quote input values (a
  validation error can quote a patient's name). A logged exception shows its type and the
  stack (file, line, function) only.
* :func:`logging_config` is the :func:`logging.config.dictConfig` document that
  ``fhir-consent serve`` hands to uvicorn (so every worker process applies it);
  :func:`configure_logging` applies it in the current process (admin commands).

What the access log holds, and why no patient data can be in it, is in docs/operations.md.
"""

from __future__ import annotations

import logging
import logging.config
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

import orjson

__all__ = [
    "ACCESS_FIELDS",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "logging_config",
    "request_id",
    "safe_traceback",
]

#: The current request's id ("-" outside a request).
request_id: ContextVar[str] = ContextVar("fhir_consent_request_id", default="-")

#: Structured fields an access-log record carries (``extra=``), in output order.
ACCESS_FIELDS: Final = ("method", "route", "status", "duration_ms", "bytes")

#: Libraries whose debug output can quote request parameters or SQL values: never below
#: WARNING, whatever the server's level.
_QUIET_LIBRARIES: Final = ("authlib", "sqlalchemy", "httpx", "httpcore", "multipart", "asyncio")


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def safe_traceback(exc_info: ExcInfo) -> str:
    """``Type`` and the stack frames of an exception, without its message (nor its causes')."""
    kind, _value, tb = exc_info
    frames = traceback.extract_tb(tb)
    lines = [f"{kind.__module__}.{kind.__qualname__}"]
    lines += [f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in frames]
    return "\n".join(lines)


def _exc_info(record: logging.LogRecord) -> Any:
    info = record.exc_info
    return info if info and info[0] is not None else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id.get(),
        }
        for name in ACCESS_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        info = _exc_info(record)
        if info is not None:
            doc["exc_type"] = f"{info[0].__module__}.{info[0].__qualname__}"
            doc["stack"] = safe_traceback(info)
        return orjson.dumps(doc, default=str).decode("utf-8")


class TextFormatter(logging.Formatter):
    """``time level logger [request id] message key=value…`` (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        rid = getattr(record, "request_id", None) or request_id.get()
        parts = [ts, record.levelname, record.name, f"[{rid}]", record.getMessage()]
        parts += [
            f"{name}={getattr(record, name)}"
            for name in ACCESS_FIELDS
            if getattr(record, name, None) is not None
        ]
        line = " ".join(parts)
        info = _exc_info(record)
        if info is not None:
            line += "\n" + safe_traceback(info)
        return line


def logging_config(log_format: str = "json", level: str = "info") -> dict[str, Any]:
    """The ``dictConfig`` document: one stderr handler on the root logger with our formatter;
    uvicorn's loggers propagate to it; chatty libraries held at WARNING or above."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    level_name = level.upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    quiet = logging.getLevelName(max(numeric, logging.WARNING))
    loggers: dict[str, Any] = {
        name: {"handlers": [], "propagate": True, "level": level_name}
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "fhir_consent", "smart_on_fhir")
    }
    loggers.update(
        {name: {"handlers": [], "propagate": True, "level": quiet} for name in _QUIET_LIBRARIES}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"fhir_consent": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "fhir_consent": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "fhir_consent",
            }
        },
        "root": {"handlers": ["fhir_consent"], "level": level_name},
        "loggers": loggers,
    }


def configure_logging(log_format: str = "json", level: str = "info") -> None:
    """Apply :func:`logging_config` to this process."""
    logging.config.dictConfig(logging_config(log_format, level))
