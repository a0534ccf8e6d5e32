"""Paired before/after run: the same benchmark script timed on two package trees, alternately.

    python benchmarks/ab.py --before /work/base --rounds 2 -- benchmarks/bench.py --sizes tiny --no-memory

Each round runs the script once per tree (order reversed every other round), each in a fresh
process whose ``XSEQLOSS_BENCH_ROOT`` names the tree to import xseqloss from (bench.py and
linear_bench.py honour it), and reads the JSON the script writes. Only the ratios the script takes
in one run (xseqloss over the native call, over the naive layer) are compared: a time in
milliseconds moves with the machine's load between runs, a ratio of contenders seconds apart
much less. It prints, per row and ratio, the median over the rounds for each tree and
after / before (above 1: the after tree is slower relative to the same native call).

Nothing here is a test; it writes the pairs as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import harness  # noqa: E402


def _ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    """Every ``*ratio*`` number of a result file, keyed by its row and name."""
    out: dict[str, float] = {}
    for row in results:
        tag = "/".join(str(row[k]) for k in ("backend", "device", "size", "tokens", "part") if k in row)
        for key, val in row.items():
            if "ratio" in key and isinstance(val, dict):
                for name, x in val.items():
                    if isinstance(x, (int, float)):
                        out[f"{tag} {key} {name}"] = float(x)
    return out


def run_once(tree: str, script: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        env = dict(os.environ, XSEQLOSS_BENCH_ROOT=os.path.abspath(tree))
        subprocess.run([sys.executable, *script, "--json", path], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(path) as f:
            return _ratios(json.load(f)["results"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the package tree before the change")
    ap.add_argument("--after", default=ROOT, help="the package tree after it (default: this one)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "ab.json"))
    ap.add_argument("script", nargs=argparse.REMAINDER, help="-- then the benchmark script and its arguments")
    args = ap.parse_args(argv)
    script = [a for a in args.script if a != "--"]
    trees = {"before": args.before, "after": args.after}
    seen: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for r in range(args.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for which in order:
            print(f"round {r + 1}: {which} ({trees[which]})", flush=True)
            for k, v in run_once(trees[which], script).items():
                seen[which].setdefault(k, []).append(v)
    rows = {}
    print(f"\n{'row and ratio':70s} {'before':>8s} {'after':>8s} {'after/before':>12s}")
    for k in sorted(set(seen["before"]) & set(seen["after"])):
        b, a = statistics.median(seen["before"][k]), statistics.median(seen["after"][k])
        rows[k] = {"before": seen["before"][k], "after": seen["after"][k], "after_over_before": a / b}
        print(f"{k:70s} {b:8.3f} {a:8.3f} {a / b:12.3f}")
    only = sorted(set(seen["before"]) ^ set(seen["after"]))
    if only:
        print("in one tree only: " + ", ".join(only))
    harness.write_json(args.json, {"environment": harness.environment(), "script": script,
                                   "trees": trees, "rows": rows})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
