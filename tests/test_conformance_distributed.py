"""``xseqloss conformance --distributed`` (API.md 9.2, conformance/distributed.py): the suite's cases
with the class axis split over 2 and 3 torch gloo processes and 4 JAX host devices (shard_map with
``class_parallel``, plain jit over a class-sharded NamedSharding), against the float64 reference.

One run of a small subset (one process per engine group) serves every test here, loss cases and
token_stats cases (the "stats" check kind, conformance/distributed_stats.py); the full subset runs in
``xseqloss conformance`` and ``--distributed`` (docs/conformance.md). The comparison can fail: a
worker's gradient checked against a wrong slice, or a wrong loss or stats output, gives a failing
row; a planted bug in the torch backend's entropy, applied in the worker processes, fails the stats
rows; a missing framework is "not applicable", never a pass.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from helpers.support import require_or_skip, required_backends

# Small on purpose: C = 8 (NCT) and C = 12 divide by the 4 JAX devices, C = 6 (TNC) is uneven
# everywhere (shard_map pads it to 8 with num_classes=6); smoothing both ways, z-loss, softcap, class weights, soft targets,
# masks, lengths, weights, ignore, a per-sequence reduction over positions.
SUBSET = ["tp_c8_zloss_softcap_mix", "tp_c12_soft_cw_zloss", "mix_others_tnc", "red_per_sequence_positions"]
# token_stats (the "stats" check kind, conformance/distributed_stats.py): C = 6 (TNC, padded to 8 under
# shard_map) with ids, shift, a mask and T = 0.5; C = 8 (NTC) with ids and a per-token temperature.
STATS_SUBSET = ["st_ids3_tnc_shift_t05", "tp_st_c8_temp_token_ids"]
STATS_CHECKS = {"stats", "stats_replicated", "stats_vjp"}
ENGINE_ROWS = {("torch", "cpu x2", "gloo class_parallel"), ("torch", "cpu x3", "gloo class_parallel"),
               ("jax", "cpu x4", "shard_map class_parallel"), ("jax", "cpu x4", "jit NamedSharding")}
REQUIRED_KEYS = {"backend", "device", "engine", "dtype", "case", "check", "error", "tolerance", "passed", "detail"}


def _suite():
    from xseqloss.cli import _suite
    return _suite()  # xseqloss._conformance, installed or loaded from the repository's conformance/


@pytest.fixture(scope="module")
def suite():
    return _suite()


@pytest.fixture(scope="module")
def run(suite):
    """The subset's report and the workers' raw outcomes (per engine and case)."""
    outcomes: dict = {}
    report = suite.run_distributed(cases=SUBSET + STATS_SUBSET, outcomes=outcomes, timeout=300)
    for na in report["not_applicable"]:
        if na["backend"] in required_backends() or "all" in required_backends():
            pytest.fail(f"required engine not run: {na}")
    return report, outcomes


def _engines(report):
    return {(r["backend"], r["device"], r["engine"]) for r in report["results"]}


def _missing(report):
    return {na["backend"] for na in report["not_applicable"]}


def test_subset_is_declared(suite):
    d = suite.distributed
    names = [s["name"] for s in d.specs(SUBSET)]
    assert names == sorted(names, key=[s["name"] for s in d.specs()].index) and len(names) == len(SUBSET)
    # the full subset: at least 40 base cases, float64 and float32 each, and cases for shard_map
    full = d.specs()
    base = {s["name"] for s in suite.cases.BASE_CASES}
    assert not {s["name"] for s in d.TP_CASES} & base and len({s["name"] for s in full}) == len(full)
    assert len(full) >= 40 and all(set(s["dtypes"]) == {"float64", "float32"} for s in full)
    assert len(d.plan("jax-shard_map", full)) >= 2 * 12
    opts = [dict(s.get("options", {}), **s) for s in full]
    for key, value in (("smoothing", "others"), ("targets", "soft"), ("inputs", "log_probs"), ("inputs", "probs"),
                       ("class_weights", "random"), ("mask", 0.25), ("lengths", "random"), ("weights", "random")):
        assert any(o.get(key) == value for o in opts), (key, value)
    for red in ("none", "sum", "mean", "per_sequence", "per_position", "sequence_mean"):
        for den in ("weights", "tokens", "positions"):
            assert any(o.get("reduction", "mean") == red and o.get("denominator", "weights") == den for o in opts) \
                or red in ("none", "sum"), (red, den)
    assert any(o.get("z_loss") for o in opts) and any(o.get("logit_softcap") for o in opts)
    # uneven slices: over 3 ranks one rank holds a single class; over 2 ranks the halves differ
    assert d.torch_slices(6, 2, "x") == [4, 2]
    # token_stats: the declared stats cases, over the options of API.md 11 that a split can get wrong
    ds = suite.distributed_stats
    assert [s["name"] for s in ds.stats_specs(STATS_SUBSET)] == STATS_SUBSET
    assert not {s["name"] for s in d.specs(STATS_SUBSET)}  # the patterns select no loss case
    stats = ds.stats_specs()
    assert len(stats) >= 20 and all(set(s["dtypes"]) <= {"float64", "float32"} and s["dtypes"] for s in stats)
    assert all(s["shape"]["C"] >= 3 for s in stats) and any(s["shape"]["C"] % 4 == 0 for s in stats)
    assert {s["layout"] for s in stats} >= {"NTC", "NCT", "TNC", "NC", "C"}
    assert {str(s.get("temperature", 1.0)) for s in stats} >= {"1.0", "0.5", "1.5", "sequence", "token"}
    for key in ("ids", "mask", "lengths", "ignore", "segments", "garbage"):
        assert any(s.get(key) for s in stats), key
    assert any(s.get("targets") == "none" for s in stats)
    assert any(s.get("options", {}).get("shift") for s in stats)
    assert any(s.get("options", {}).get("logit_softcap") for s in stats)
    assert {"neginf", "masked_vocab", "negative", "ties", "confident"} <= {s.get("logits") for s in stats}
    for name in ("a", "b", "c", "d"):
        s = d.torch_slices(8, 3, name)
        assert sum(s) == 8 and 1 in s and len(set(s)) > 1


def test_every_row_passes_on_every_engine(run):
    report, _ = run
    fails = [r for r in report["results"] if not r["passed"]]
    assert not fails, "\n".join(f"{r['backend']}/{r['device']} [{r['engine']}] {r['case']} {r['check']}: "
                                f"{r['error']:.3g} > {r['tolerance']:g} {r['detail']}" for r in fails)
    present = _engines(report)
    expected = {e for e in ENGINE_ROWS if e[0] not in _missing(report)}
    assert present == expected
    assert present, "no engine ran (torch and jax missing?)"
    for backend, device, engine in present:
        rows = [r for r in report["results"] if (r["backend"], r["device"], r["engine"]) == (backend, device, engine)]
        assert {r["check"] for r in rows} == {"value", "grad", "upstream", "replicated"} | STATS_CHECKS
        assert {r["dtype"] for r in rows} == {"float64", "float32"}
        assert all(REQUIRED_KEYS <= set(r) for r in rows)
        cases = {r["case"].split("/")[0] for r in rows}
        # shard_map too: the uneven C = 6 cases through vocabulary padding
        assert cases == set(SUBSET) | {f"stats:{n}" for n in STATS_SUBSET}
        for n in STATS_SUBSET:  # every stats check on both dtypes
            got = {(r["check"], r["dtype"]) for r in rows if r["case"].startswith(f"stats:{n}/")}
            assert got == {(c, dt) for c in STATS_CHECKS for dt in ("float64", "float32")}, (n, got)
        tol = {r["dtype"]: r["tolerance"] for r in rows if r["check"] == "value"}
        assert tol == {"float64": 1e-10, "float32": 1e-5}  # the suite's tolerances


def test_each_worker_returns_its_own_slice(run):
    report, outcomes = run
    if "torch" not in _missing(report):
        o = outcomes["torch-3"]["tp_c8_zloss_softcap_mix/float64"]  # NCT: the class axis is axis 1
        spans = sorted(tuple(p["index"][1]) for p in o["pieces"])
        assert spans[0][0] == 0 and spans[-1][1] == 8 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert min(e - s for s, e in spans) == 1 and len(o["values"]) == 3
    if "jax" not in _missing(report):
        o = outcomes["jax-shard_map"]["tp_c12_soft_cw_zloss/float32"]
        assert sorted(tuple(p["index"][2]) for p in o["pieces"]) == [(0, 3), (3, 6), (6, 9), (9, 12)]
        assert len(o["values"]) == 4
        o = outcomes["jax-jit"]["tp_c8_zloss_softcap_mix/float64"]  # device_put class-sharded: so is d logits
        assert sorted(tuple(p["index"][1]) for p in o["pieces"]) == [(0, 2), (2, 4), (4, 6), (6, 8)]
        # token_stats: C = 6 padded to 8 (the last device holds padding only, left out), and C = 8
        o = outcomes["jax-shard_map"]["stats:st_ids3_tnc_shift_t05/float32"]
        assert sorted(tuple(p["index"][2]) for p in o["pieces"]) == [(0, 2), (2, 4), (4, 6)]
        assert len(o["copies"]) == 4 and o["padding_ok"] is True
        o = outcomes["jax-jit"]["stats:tp_st_c8_temp_token_ids/float64"]
        assert sorted(tuple(p["index"][2]) for p in o["pieces"]) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    if "torch" not in _missing(report):
        o = outcomes["torch-3"]["stats:st_ids3_tnc_shift_t05/float64"]  # TNC: the class axis is axis 2
        spans = sorted(tuple(p["index"][2]) for p in o["pieces"])
        assert spans[0][0] == 0 and spans[-1][1] == 6 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert min(e - s for s, e in spans) == 1 and len(o["copies"]) == 3


def _shift(pieces, axis, by):
    out = copy.deepcopy(pieces)
    s, e = out[-1]["index"][axis]
    out[-1]["index"][axis] = (s + by, e + by)
    return out


@pytest.mark.parametrize("engine", ["torch-2", "jax-shard_map"])
def test_a_wrong_slice_or_loss_fails(run, suite, engine):
    """The same comparison, fed a worker's gradient at a slice one class off, or a worker's loss off by
    1e-6, reports failing rows; fed the real outcome, passing ones."""
    report, outcomes = run
    d = suite.distributed
    backend, device, label = d.ENGINES[engine]
    if backend in _missing(report):
        pytest.skip(f"{backend} is not installed (reported as not applicable)")
    spec = [s for s in d.specs(SUBSET) if s["name"] == "tp_c8_zloss_softcap_mix"][0]
    case = d.make_case(spec, "float64")
    ref = d.reference_of(case)
    real = outcomes[engine][case.name]

    def rows(o):
        return {r["check"]: r for r in d.check_sharded(backend, device, label, case, ref, o,
                                                       workers=d.workers_of(engine))}

    assert all(r["passed"] for r in rows(real).values())
    axis = case.layout.index("C")
    wrong = dict(real, pieces=_shift(real["pieces"], axis, -1))  # the last worker's slice, one class early
    got = rows(wrong)
    assert not got["grad"]["passed"] and got["value"]["passed"]
    assert got["grad"]["error"] > 1e-3
    ups = [(ct, _shift(p, axis, -1)) for ct, p in real["upstream"]]
    assert not rows(dict(real, upstream=ups))["upstream"]["passed"]
    values = [(w, v) for w, v in real["values"]]
    values[-1] = (values[-1][0], np.asarray(values[-1][1]) + 1e-6)
    got = rows(dict(real, values=values))
    assert not got["value"]["passed"] and not got["replicated"]["passed"] and got["grad"]["passed"]
    assert "rank" in got["value"]["detail"] or "device" in got["value"]["detail"]
    got = rows(dict(real, values=real["values"][:-1], pieces=real["pieces"][:-1]))  # a worker missing
    assert not got["value"]["passed"] and not got["grad"]["passed"] and "cover" in got["grad"]["detail"]
    got = rows(dict(real, padding_ok=False))  # shard_map: a padded vocabulary column with a gradient
    assert not got["value"]["passed"] and "padding" in got["value"]["detail"]
    got = rows({"error": "rank 1 of 2: RuntimeError: boom"})
    assert not got["value"]["passed"] and not got["grad"]["passed"] and "boom" in got["grad"]["detail"]


@pytest.mark.parametrize("engine", ["torch-3", "jax-shard_map"])
def test_a_wrong_stats_output_or_slice_fails(run, suite, engine):
    """The stats comparison, fed one worker's entropy off by 1e-3, every worker's entropy off alike, a
    local instead of a global argmax, a gradient slice one class off, or a worker left out, reports
    failing rows; fed the real outcome, passing ones."""
    report, outcomes = run
    d, ds = suite.distributed, suite.distributed_stats
    backend, device, label = d.ENGINES[engine]
    if backend in _missing(report):
        pytest.skip(f"{backend} is not installed (reported as not applicable)")
    name = "tp_st_c8_temp_token_ids"
    (case, ref), = ds.references(ds.stats_specs([name]), [(name, "float64")]).values()
    real = outcomes[engine][ds.key(case.name)]

    def rows(o):
        return {r["check"]: r for r in ds.check_sharded_stats(backend, device, label, case, ref, o,
                                                              workers=d.workers_of(engine))}

    def with_copy(o, i, field, fn):
        copies = copy.deepcopy(o["copies"])
        for j, (w, out, dts) in enumerate(copies):
            if i is None or i == j:
                out[field] = fn(out[field])
        return dict(o, copies=copies)

    assert all(r["passed"] for r in rows(real).values()) and set(rows(real)) == STATS_CHECKS
    got = rows(with_copy(real, len(real["copies"]) - 1, "entropy", lambda v: v + 1e-3))  # one worker
    assert not got["stats"]["passed"] and not got["stats_replicated"]["passed"] and got["stats_vjp"]["passed"]
    assert "entropy" in got["stats"]["detail"] and "entropy" in got["stats_replicated"]["detail"]
    got = rows(with_copy(real, None, "entropy", lambda v: v * 1.01))  # every worker alike: still wrong
    assert not got["stats"]["passed"] and got["stats_replicated"]["passed"]
    lo = real["pieces"][-1]["index"][2][0]  # the last worker's local argmax (its first class is lo)
    got = rows(with_copy(real, len(real["copies"]) - 1, "argmax", lambda v: np.where(v >= lo, v - lo, v)))
    assert not got["stats"]["passed"] and "argmax" in got["stats"]["detail"]
    got = rows(dict(real, pieces=_shift(real["pieces"], 2, -1)))  # the last worker's slice, one class early
    assert got["stats"]["passed"] and not got["stats_vjp"]["passed"] and got["stats_vjp"]["error"] > 1e-3
    got = rows(dict(real, copies=real["copies"][:-1], pieces=real["pieces"][:-1]))  # a worker missing
    assert not got["stats"]["passed"] and "cover" in got["stats_vjp"]["detail"] and not got["stats_vjp"]["passed"]
    got = rows(dict(real, padding_ok=False))
    assert not got["stats"]["passed"] and "padding" in got["stats"]["detail"]
    got = rows({"error": "rank 1 of 3: RuntimeError: boom"})
    assert not got["stats"]["passed"] and not got["stats_vjp"]["passed"] and "boom" in got["stats_vjp"]["detail"]


# The planted bug of test_conformance_mutations.py (the entropy of softmax(z / T^2) in the torch
# backend's token_stats_rows), applied in the torch launcher's process before it forks the ranks: the
# child program gets a prelude (the suite's own worker code runs unchanged after it).
PLANT = """
import sys
if sys.argv[3] == "torch":
    import pytest
    from test_conformance_mutations import _entropy_at_temperature_squared
    _entropy_at_temperature_squared(pytest.MonkeyPatch())
"""


def test_planted_double_temperature_in_torch_entropy_fails_the_distributed_stats_rows(suite, monkeypatch):
    require_or_skip("torch")
    d = suite.distributed
    monkeypatch.setattr(d, "_CHILD", PLANT + d._CHILD)
    cases = STATS_SUBSET + ["st_ntc"]  # st_ntc: T = 1, which the planted bug cannot move
    report = d.run_distributed(backends=["torch"], cases=cases, timeout=300)
    rows = report["results"]
    assert {(r["engine"], r["device"]) for r in rows} == {("gloo class_parallel", "cpu x2"),
                                                          ("gloo class_parallel", "cpu x3")}
    failing = {(r["device"], r["case"].split("/")[0], r["check"]) for r in rows if not r["passed"]}
    assert failing == {(dev, f"stats:{n}", check) for dev in ("cpu x2", "cpu x3") for n in STATS_SUBSET
                       for check in ("stats", "stats_vjp")}, failing
    assert all("entropy" in r["detail"] for r in rows if not r["passed"] and r["check"] == "stats")


def test_a_missing_engine_is_not_applicable_never_a_pass(suite, monkeypatch):
    d = suite.distributed
    monkeypatch.setattr(d, "_available", lambda b: f"{b} is not installed (pip install 'xseqloss[{b}]')")
    report = d.run_distributed(cases=SUBSET)
    assert report["results"] == []
    assert {(na["backend"], na["reason"].split(":")[0]) for na in report["not_applicable"]} == {
        ("torch", "cpu x2 gloo class_parallel"), ("torch", "cpu x3 gloo class_parallel"),
        ("jax", "cpu x4 shard_map class_parallel"), ("jax", "cpu x4 jit NamedSharding")}
    assert all(na["cases"] > 0 for na in report["not_applicable"])
    with pytest.raises(RuntimeError, match="requested"):  # named on the command line: an error
        d.run_distributed(backends=["torch"], cases=SUBSET)


def test_cli_distributed_only_and_in_the_full_report(suite, monkeypatch, tmp_path, capsys):
    """--distributed runs only this mode; the full report (no --cases / --quick) adds it; --quick,
    --cases and --no-distributed leave it out. Engines stubbed here: the real run is the fixture's."""
    from xseqloss.cli import main
    d = suite.distributed
    monkeypatch.setattr(d, "_available", lambda b: f"{b} is not installed")
    out = tmp_path / "r.json"
    assert main(["conformance", "--distributed", "--json", str(out)]) == 1  # nothing could run: not a pass
    rep = json.loads(out.read_text())
    assert rep["results"] == [] and len(rep["not_applicable"]) == 4 and rep["environment"]["distributed_only"]
    assert "no checks ran" in capsys.readouterr().err

    calls = []
    real_run_distributed = suite.run_distributed
    monkeypatch.setattr(suite, "run", lambda **kw: calls.append(("run", kw)) or {
        "environment": {"seconds": 1.0, "seconds_per_backend": {"numpy/cpu": 1.0}},
        "results": [{"backend": "numpy", "device": "cpu", "engine": "auto", "dtype": "float64", "case": "x",
                     "check": "value", "error": 0.0, "tolerance": 1e-10, "passed": True, "detail": ""}],
        "not_applicable": []})
    monkeypatch.setattr(suite, "run_distributed", lambda **kw: calls.append(("distributed", kw))
                        or real_run_distributed(**kw))
    monkeypatch.setattr(suite, "write_json", lambda rep, path: calls.append(("json", rep)))
    assert main(["conformance", "--json", str(out)]) == 0
    assert [c[0] for c in calls] == ["run", "distributed", "json"]
    merged = calls[-1][1]
    assert len(merged["not_applicable"]) == 4 and merged["environment"]["distributed"]["engines"] == []
    # the default is the representative subset (issue 28): quick single-device cases and a few
    # distributed ones; --full runs every case of both
    assert calls[0][1]["quick"] is True and merged["environment"]["selection"] == "subset"
    assert calls[1][1]["cases"] == list(suite.runner.QUICK_DISTRIBUTED)
    assert {s["name"] for s in d.specs(list(suite.runner.QUICK_DISTRIBUTED))} >= set(SUBSET)
    calls.clear()
    assert main(["conformance", "--full", "--json", str(out)]) == 0
    assert [c[0] for c in calls] == ["run", "distributed", "json"]
    assert calls[0][1]["quick"] is False and calls[1][1]["cases"] is None
    assert calls[-1][1]["environment"]["selection"] == "full"
    for flags in (["--quick"], ["--cases", "ntc"], ["--no-distributed"], ["--devices", "gpu"]):
        calls.clear()
        main(["conformance", *flags])
        assert [c[0] for c in calls] == ["run"], flags
