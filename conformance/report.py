"""Summaries and the Markdown report of a conformance run."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Iterable

from .cases import TOLERANCE


def ratio(r: dict) -> float:
    """error / tolerance (0 for an exact check that held, inf for one that did not)."""
    if r["tolerance"] == 0:
        return 0.0 if r["error"] == 0 else math.inf
    return r["error"] / r["tolerance"]


def _fmt(x: float) -> str:
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.3g}"


BY = ("backend", "device", "engine", "dtype")


def summary_rows(results: Iterable[dict], by: tuple[str, ...] = BY) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[tuple(r.get(k, "auto") for k in by)].append(r)  # "engine": absent in older reports
    rows = []
    for key in sorted(groups):
        rs = groups[key]
        failed = sum(1 for r in rs if not r["passed"])
        rows.append({**dict(zip(by, key)),
                     "cases": len({r["case"] for r in rs}),
                     "checks": len(rs),
                     "failed": failed,
                     "worst": max((ratio(r) for r in rs), default=0.0),
                     "passed": failed == 0})
    return rows


def summary_table(results: Iterable[dict], by: tuple[str, ...] = BY) -> str:
    """A Markdown table: one row per (backend, device, engine, dtype)."""
    rows = summary_rows(results, by)
    head = [*by, "cases", "checks", "failed", "worst error/tolerance", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([*(str(r[k]) for k in by), str(r["cases"]), str(r["checks"]),
                                        str(r["failed"]), _fmt(r["worst"]), "pass" if r["passed"] else "FAIL"])
                     + " |")
    return "\n".join(lines)


def text_summary(report: dict) -> str:
    """A plain-text summary for the terminal."""
    rows = summary_rows(report["results"])
    label = (lambda r: f"{r['backend']}/{r['device']}" + ("" if r.get("engine", "auto") == "auto"
                                                           else f" [{r['engine']}]"))
    w = max([len(label(r)) for r in rows] + [10])
    out = [f"{'backend/device [kernel]':<{w}}  {'dtype':<9} {'cases':>6} {'checks':>7} {'failed':>7} {'worst':>9}"
           f"  result"]
    for r in rows:
        out.append(f"{label(r):<{w}}  {r['dtype']:<9} {r['cases']:>6} {r['checks']:>7} "
                   f"{r['failed']:>7} {_fmt(r['worst']):>9}  {'pass' if r['passed'] else 'FAIL'}")
    fails = [r for r in report["results"] if not r["passed"]]
    out.append(f"{len(report['results'])} checks, {len(fails)} failed, "
               f"{report['environment'].get('seconds', '?')}s")
    for r in fails[:40]:
        out.append(f"  FAIL {label(r)} {r['case']} {r['check']}: error {_fmt(r['error'])} "
                   f"> {r['tolerance']:g} {r['detail']}")
    if len(fails) > 40:
        out.append(f"  ... and {len(fails) - 40} more (see the JSON or Markdown report)")
    return "\n".join(out)


def markdown(report: dict, title: str = "xseqloss conformance report", note: str = "") -> str:
    env = report["environment"]
    res = report["results"]
    fails = [r for r in res if not r["passed"]]
    L = [f"# {title}", ""]
    if note:
        L += [note, ""]
    if env.get("selection") == "subset":
        L += ["**A representative subset** (`xseqloss conformance` without `--full`): every backend, kernel, "
              "engine and check kind on a few cases each; `--full` runs every case.", ""]
    if env.get("distributed_only"):
        L += ["**Classes split across workers only** (`xseqloss conformance --distributed`): every result "
              "below is on CPU workers; the full report also has the single-device suite.", ""]
    elif not env.get("gpu_found"):
        L += ["**No GPU was found in this run**: every result below is on CPU. The suite runs on CUDA "
              "(PyTorch) and GPU (JAX, TensorFlow) by itself wherever one is present.", ""]
    L += [f"Generated {env['date']} on {env['platform']} ({env.get('cpu_count')} CPUs), Python {env['python']}, "
          f"xseqloss {env['xseqloss']}; total {env.get('seconds', '?')} s"
          + (f" with {env['jobs']} backends at a time" if env.get("jobs", 1) > 1 else "")
          + (" (" + ", ".join(f"{k} {v} s" for k, v in env["seconds_per_backend"].items()) + ")"
             if env.get("seconds_per_backend") else "") + ".", ""]
    vers = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    L += [f"Versions: {vers}" + (f"; Keras backend {env['keras_backend']}" if env.get("keras_backend") else "")
          + ".", ""]
    L += ["Devices: " + "; ".join(f"{b}: {', '.join(d)}" for b, d in env["devices"].items()) + ".", ""]
    if env.get("distributed"):
        d = env["distributed"]
        L += [f"Classes split across workers (API.md 9.2, conformance/distributed.py): "
              f"{', '.join(d['engines']) or 'no engine ran'}; {d['cases']['base']} base cases "
              f"({d['cases']['with_dtypes']} with dtypes)"
              + (f" and {d['cases']['stats']} token_stats cases" if d["cases"].get("stats") else "")
              + f", {d['seconds']} s. Their rows have the device "
              "`cpu xN` (N workers) and the engine that split the classes; `grad` compares each worker's "
              "gradient with its slice of the reference gradient, `replicated` that every worker holds "
              "bitwise the same loss; `stats`, `stats_replicated` and `stats_vjp` do the same for every "
              "output of `token_stats` and its gradient under random cotangents.", ""]
    L += [f"**{len(res)} checks, {len(fails)} failed.** Tolerances on max |x - ref| / (1 + |ref|): "
          + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items())
          + "; the reference is float64 on the already-rounded inputs. Exact checks (errors raised, "
            "bitwise determinism) have tolerance 0.", ""]
    L += ["## Summary by backend, device, kernel and dtype", "",
          "`engine` is the backend's kernel: `auto` is what a user gets; the others are forced "
          "(xseqloss/plan/engine.py), the chunked ones with chunks of a few rows so every case crosses "
          "chunk boundaries.", "",
          "`cases` counts distinct cases (the error catalogue's entries count under float32); "
          "`worst` is the largest error / tolerance of the group (below 1 passes).", "",
          summary_table(res), ""]
    L += ["## By check", "", summary_table(res, ("backend", "device", "engine", "check")), ""]
    if report.get("not_applicable"):
        L += ["## Not applicable (not generated, not counted as passing)", ""]
        for n in report["not_applicable"]:
            L.append(f"* {n['backend']} / {n['dtype']}: {n['cases']} cases - {n['reason']}")
        L.append("")
    nat = sorted({r["detail"] for r in res if r["check"] == "native" and r["passed"]})
    if nat:
        L += ["## Native losses compared", "", *[f"* `{n}`" for n in nat], ""]
    L += ["## Failures", ""]
    if not fails:
        L += ["None.", ""]
    else:
        L += ["| backend | device | engine | dtype | case | check | error | tolerance | detail |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in fails:
            d = r["detail"].replace("|", "\\|").replace("\n", " ")
            L.append(f"| {r['backend']} | {r['device']} | {r.get('engine', 'auto')} | {r['dtype']} | {r['case']} | {r['check']} | "
                     f"{_fmt(r['error'])} | {r['tolerance']:g} | {d} |")
        L.append("")
    return "\n".join(L)


def _round(x):
    return float(f"{x:.4g}") if isinstance(x, float) else x  # 4 digits say how far from the tolerance


def write_json(report: dict, path: str) -> None:
    def clean(x):  # JSON has no inf/nan: write them as strings
        if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    report = clean(report)
    with open(path, "w") as f:  # one result per line: compact, and diffs stay readable
        f.write("{\n")
        for key in [k for k in report if k != "results"]:
            f.write(f"{json.dumps(key)}: {json.dumps(report[key], sort_keys=True)},\n")
        f.write('"results": [\n')
        f.write(",\n".join(json.dumps({**r, "error": _round(r["error"])}) for r in report["results"]))
        f.write("\n]}\n")


def read_json(path: str) -> dict:
    """A report written by write_json, with "inf" / "nan" strings back as floats."""
    with open(path) as f:
        report = json.load(f)
    for r in report["results"]:
        for k in ("error", "tolerance"):
            if isinstance(r[k], str):
                r[k] = float(r[k])
    return report


def write_markdown(report: dict, path: str, **kw) -> None:
    with open(path, "w") as f:
        f.write(markdown(report, **kw))
