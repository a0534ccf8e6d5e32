"""``pytest conformance``: the suite's results as tests, one per backend and check kind."""

from __future__ import annotations

import pytest

from .checks import CHECKS
from .runner import BACKENDS

# Under pytest-xdist the tests of this file stay on one worker (--dist loadfile, README): the suite
# runs once (the session fixture) and every test reads it; spread over workers each would run it.


def _format(fails: list[dict], limit: int = 30) -> str:
    lines = [f"{len(fails)} failing:"]
    for r in fails[:limit]:
        lines.append(f"  {r['backend']}/{r['device']} {r['case']} ({r['dtype']}): error {r['error']:.3g} > "
                     f"{r['tolerance']:g} {r['detail']}")
    if len(fails) > limit:
        lines.append(f"  ... and {len(fails) - limit} more")
    return "\n".join(lines)


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_conformance(backend, check, conformance_report):
    report = conformance_report(backend)
    results = [r for r in report["results"] if r["check"] == check]
    if not results:
        pytest.skip(f"no {check!r} results for {backend} (not applicable to this backend or case selection)")
    fails = [r for r in results if not r["passed"]]
    if fails:
        pytest.fail(_format(fails), pytrace=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_case_ran(backend, conformance_report):
    """Each generated case gave a value and a gradient result on every device."""
    report = conformance_report(backend)
    per_device: dict[str, set] = {}
    for r in report["results"]:
        if r["check"] in ("value", "grad"):
            per_device.setdefault(r["device"], set()).add((r["case"], r["check"]))
    assert per_device, "no results at all"
    sizes = {d: len(s) for d, s in per_device.items()}
    assert len(set(sizes.values())) == 1, f"devices ran different numbers of cases: {sizes}"
