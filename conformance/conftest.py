"""pytest support for ``pytest conformance``.

The suite runs once per session (every installed backend, every device), and each test
reads its backend's results.  A backend whose framework is missing is skipped, unless
XSEQLOSS_REQUIRE_BACKENDS names it (comma-separated, or "all"): then the
missing framework is an error, so that a broken CI install cannot pass
quietly.  XSEQLOSS_CONFORMANCE_QUICK=1 runs the quick subset and
XSEQLOSS_CONFORMANCE_CASES=pattern,... selects base cases;
XSEQLOSS_CONFORMANCE_JOBS sets how many backends run at once (default 2).
"""

from __future__ import annotations

import os
import sys

import pytest

from .adapters import ADAPTERS
from .runner import run

_report: dict = {}


def required_backends() -> set[str]:
    value = os.environ.get("XSEQLOSS_REQUIRE_BACKENDS", "")
    if value.strip().lower() == "all":
        return set(ADAPTERS)
    return {v.strip() for v in value.split(",") if v.strip()}


@pytest.fixture(scope="session")
def conformance_report():
    """``conformance_report(backend)``: the suite's report for one backend.

    The first request runs every installed backend at once (two processes, as
    ``xseqloss conformance`` does) and the session keeps the report.
    """
    def get(backend: str) -> dict:
        if not ADAPTERS[backend].available():
            if backend in required_backends():
                pytest.fail(f"{backend} is required (XSEQLOSS_REQUIRE_BACKENDS) but not installed")
            pytest.skip(f"{backend} is not installed")
        if not _report:
            patterns = [p for p in os.environ.get("XSEQLOSS_CONFORMANCE_CASES", "").split(",") if p]
            quick = os.environ.get("XSEQLOSS_CONFORMANCE_QUICK", "") not in ("", "0")
            jobs = int(os.environ.get("XSEQLOSS_CONFORMANCE_JOBS", min(2, os.cpu_count() or 1)))
            _report.update(run(cases=patterns or None, quick=quick, jobs=jobs,
                               progress=lambda m: print(f"[conformance] {m}", file=sys.stderr)))
        return {**_report, "results": [r for r in _report["results"] if r["backend"] == backend]}
    return get
