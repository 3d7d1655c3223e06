"""Conformance checks against any running server: ``python -m conformance BASE_URL``.

Sections (docs/conformance.md):

* ``rest`` (:mod:`.rest`): is the CapabilityStatement true? Every claimed interaction and
  search parameter of every claimed type is exercised; what is not claimed is skipped;
* ``smart`` (:mod:`.smart`): SMART App Launch 2.2 discovery, OpenID, token and resource-server
  negatives, backend services and introspection, named by the test ids of
  ``shared/specs/smart-app-launch.md``;
* ``consent`` (:mod:`.consent`): the §5 table and the §2 inquiry of ``shared/specs/consent.md``,
  against a server that declares it enforces them.

Prints a pass/fail table; ``--junit FILE`` writes JUnit XML. Exit status 0 when nothing failed.
"""

from .consent import ConsentOptions, run_consent
from .report import Result, print_table, write_junit
from .rest import RestOptions, run_rest
from .smart import SmartOptions, backend_token, run_smart

__all__ = [
    "ConsentOptions",
    "RestOptions",
    "Result",
    "SmartOptions",
    "backend_token",
    "print_table",
    "run_consent",
    "run_rest",
    "run_smart",
    "write_junit",
]
