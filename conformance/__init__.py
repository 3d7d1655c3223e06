"""Conformance checks against any running server: ``python -m conformance BASE_URL``.

Sections: ``smart`` (SMART App Launch 2.2 discovery, OpenID, token and resource-server
negatives, backend services and introspection when credentials are given), named by the
test ids of ``shared/specs/smart-app-launch.md``. Prints a pass/fail table; ``--junit FILE``
writes JUnit XML. Exit status 0 when nothing failed.
"""

from .report import Result, print_table, write_junit
from .smart import SmartOptions, run_smart

__all__ = ["Result", "SmartOptions", "print_table", "run_smart", "write_junit"]
