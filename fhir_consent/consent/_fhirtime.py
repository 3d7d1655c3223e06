"""FHIR date/dateTime/instant values as ranges of epoch microseconds (private helper).

A FHIR time value has a precision, and a ``Period`` is inclusive at both ends: R4 datatypes
§2.24.0.10 says "2012-02-03T10:00:00 is in a period that has an end value of 2012-02-03". So every
value here becomes the closed range ``[lo, hi]`` of the instants it covers, in integer
microseconds since 1970-01-01T00:00Z (ints compare exactly and fast; see consent.md §3.3).

Values without a time (``2015``, ``2015-06``, ``2015-06-01``) carry no zone in FHIR; this engine
reads them as UTC. A value *with* a time but without a zone is invalid FHIR ("If hours and minutes
are specified, a timezone offset SHALL be populated") and is rejected.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, date, datetime, timedelta

__all__ = [
    "MAX_US",
    "MIN_US",
    "OPEN_END_US",
    "OPEN_START_US",
    "datetime_to_us",
    "parse_fhir_time",
    "us_to_datetime",
]

#: Sentinels for an open end of a period (far beyond any representable datetime).
MIN_US = -(1 << 62)
MAX_US = 1 << 62

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_DAY_US = 86_400_000_000

_TIME_RE = re.compile(
    r"(?P<y>[0-9]{4})"
    r"(?:-(?P<m>[0-9]{2})"
    r"(?:-(?P<d>[0-9]{2})"
    r"(?:T(?P<H>[0-9]{2}):(?P<M>[0-9]{2}):(?P<S>[0-9]{2})(?:\.(?P<f>[0-9]+))?"
    r"(?P<tz>Z|[+-][0-9]{2}:[0-9]{2})?"
    r")?)?)?"
)


def _day_us(y: int, m: int, d: int) -> int:
    """Epoch microseconds of 00:00 UTC on a calendar day (raises ValueError if invalid)."""
    return (date(y, m, d).toordinal() - _EPOCH_ORDINAL) * _DAY_US


#: The open sides of a resource's Period (R4: no start = unknown, no end = ongoing): the first
#: and last instants a ``datetime`` can hold (0001-01-01T00:00Z, 9999-12-31T23:59:59.999999Z).
OPEN_START_US = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _ONE_US
OPEN_END_US = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _ONE_US


def parse_fhir_time(value: object) -> tuple[int, int]:
    """Parse a FHIR date, dateTime or instant into its inclusive ``(lo, hi)`` microsecond range.

    Raises ``ValueError`` for anything that is not a valid FHIR value (wrong type, bad calendar
    date, time without zone, out-of-range fields).
    """
    if not isinstance(value, str):
        raise ValueError(f"FHIR time value must be a string, not {type(value).__name__}")
    m = _TIME_RE.fullmatch(value)
    if m is None:
        raise ValueError(f"not a FHIR date/dateTime: {value!r}")
    y = int(m["y"])
    if y < 1:
        raise ValueError(f"year out of range: {value!r}")
    if m["m"] is None:
        lo = _day_us(y, 1, 1)
        days = 366 if calendar.isleap(y) else 365
        return lo, lo + days * _DAY_US - 1
    month = int(m["m"])
    if not 1 <= month <= 12:
        raise ValueError(f"month out of range: {value!r}")
    if m["d"] is None:
        lo = _day_us(y, month, 1)
        return lo, lo + calendar.monthrange(y, month)[1] * _DAY_US - 1
    lo = _day_us(y, month, int(m["d"]))
    if m["H"] is None:
        return lo, lo + _DAY_US - 1
    tz = m["tz"]
    if tz is None:
        raise ValueError(f"dateTime with a time must have a zone: {value!r}")
    hh, mm, ss = int(m["H"]), int(m["M"]), int(m["S"])
    if hh > 23 or mm > 59 or ss > 60:
        raise ValueError(f"time out of range: {value!r}")
    lo += ((hh * 60 + mm) * 60 + ss) * 1_000_000
    frac = m["f"]
    if frac is None:
        unit = 1_000_000
    else:
        digits = frac[:6]
        lo += int(digits.ljust(6, "0"))
        unit = 10 ** (6 - len(digits))
    if tz != "Z":
        oh, om = int(tz[1:3]), int(tz[4:6])
        if oh > 14 or om > 59:
            raise ValueError(f"zone offset out of range: {value!r}")
        offset = (oh * 60 + om) * 60_000_000
        lo += -offset if tz[0] == "+" else offset
    return lo, lo + unit - 1


def datetime_to_us(value: datetime) -> int:
    """Epoch microseconds of a timezone-aware datetime (ValueError if it is naive)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware")
    return (value - _EPOCH) // _ONE_US


def us_to_datetime(value: int) -> datetime:
    """The UTC datetime of an epoch-microsecond value."""
    return _EPOCH + timedelta(microseconds=value)
