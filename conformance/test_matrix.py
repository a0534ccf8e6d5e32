"""The case matrix itself: big enough, every option and value covered, deterministic."""

from __future__ import annotations

import numpy as np

from . import cases
from .errors import CATALOGUE, make


def test_at_least_150_cases_per_backend():
    all_cases = cases.expand()
    assert len(all_cases) >= 150
    # numpy may not take bfloat16: still well over 150 without it
    assert sum(c.dtype != "bfloat16" for c in all_cases) >= 150


def test_every_option_value_appears():
    specs = cases.BASE_CASES
    seen: dict[str, set] = {}
    for s in specs:
        for k, v in {"layout": s["layout"], **s.get("options", {})}.items():
            seen.setdefault(k, set()).add(repr(v))
        seen.setdefault("inputs", set()).add(repr(s.get("inputs", "logits")))
        seen.setdefault("targets", set()).add(s.get("targets", "index"))
    for r in ("none", "sum", "per_sequence", "per_position", "sequence_mean"):
        assert repr(r) in seen["reduction"]
    for d in ("tokens", "positions"):
        assert repr(d) in seen["denominator"]
    assert {"'log_probs'", "'probs'"} <= seen["inputs"]
    assert "soft" in seen["targets"]
    assert {"'nan'"} <= seen["empty"]
    assert {"'others'"} <= seen["smoothing"]
    for layout in ("NTC", "NCT", "TNC", "NC", "C", "TC", "CNT"):
        assert repr(layout) in seen["layout"]
    sizes = [s["shape"] for s in specs]
    assert any(z.get("N") == 1 for z in sizes) and any(z.get("T") == 1 for z in sizes)
    assert {1, 2, 32000} <= {z["C"] for z in sizes}


def test_inputs_are_deterministic_and_rounded():
    spec = next(s for s in cases.BASE_CASES if s["name"] == "mix_uniform")
    a, b = cases.make_case(spec, "bfloat16"), cases.make_case(spec, "bfloat16")
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    x = a.arrays["logits"]
    assert np.array_equal(cases.round_to(x, "bfloat16"), x)  # already representable in bfloat16


def test_bfloat16_rounding_matches_ml_dtypes():
    ml_dtypes = __import__("pytest").importorskip("ml_dtypes")
    x = np.random.default_rng(0).normal(size=10000) * np.logspace(-3, 4, 10000)
    x = np.concatenate([x, [np.inf, -np.inf, 0.0, -0.0, 1e4]])
    want = x.astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(cases.round_to(x, "bfloat16"), want)


def test_error_catalogue_builds():
    for entry in CATALOGUE:
        arrays, options = make(entry)
        assert "logits" in arrays and "targets" in arrays, entry["name"]
