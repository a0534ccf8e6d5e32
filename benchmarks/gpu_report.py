"""The summary of benchmarks/gpu.py's run: OUTDIR/gpu-bench.md (environment, what was skipped and
why, one table per benchmark group, errors) beside OUTDIR/gpu-bench.json."""

from __future__ import annotations

import os
from typing import Any

import harness


def number(v: Any, spec: str = ".3g") -> str:
    """A number in a table cell or a progress line; "-" for none."""
    return "-" if v is None else format(v, spec)


def _cell(v: Any) -> str:
    return str(v).replace("|", "/").replace("\n", " ")


def render_markdown(result: dict) -> str:
    """The summary: environment, skips, then one table per benchmark group."""
    env = result.get("environment", {})
    out = ["# xseqloss GPU benchmarks", ""]
    out.append(f"Date {env.get('date', '?')}; GPU: {env.get('gpu') or 'none'}; torch {env.get('torch', '?')}, "
               f"triton {env.get('triton') or 'missing'}, jax {env.get('jax') or 'missing'}, "
               f"liger_kernel {env.get('liger_kernel') or 'missing'}, "
               f"cut_cross_entropy {env.get('cut_cross_entropy') or 'missing'}; "
               f"budget {env.get('budget_s', '?')} s, took {number(result.get('seconds'), '.0f')} s.")
    out.append("")
    out.append("Times: median of CUDA-event timings in ms. `x floor`: the time over one device-to-device "
               "copy of the logits in the same run (read once + write once, the least a cross-entropy "
               "forward+backward moves). `peak`: max_memory_allocated above the inputs, in multiples of "
               "the logits' size. `vs ref`: time over the group's reference row.")
    out.append("")
    skipped = result.get("skipped", [])
    out.append("## Skipped")
    out.append("")
    if skipped:
        out.extend(f"- SKIPPED: {s['what']}: {s['why']}" for s in skipped)
    else:
        out.append("Nothing was skipped.")
    out.append("")
    groups: dict[tuple, list[dict]] = {}
    for r in result.get("rows", []):
        if r.get("bench") in ("ce", "lce", "sweep"):
            groups.setdefault((r["bench"], r["size"], r["dtype"]), []).append(r)
    titles = {"ce": "Cross-entropy forward+backward", "lce": "Fused output layer forward+backward",
              "sweep": "Triton launch configurations (kernel alone, loss + gradient)"}
    for (bench, size, dtype), rows in groups.items():
        ref = next((r for r in rows if r.get("reference")), None)
        out += [f"## {titles[bench]}, {size}, {dtype}", ""]
        extra = " | x matmuls" if bench == "lce" else ""
        out += [f"| contender | ms | x floor{extra} | peak (x logits) | vs ref | loss | note |",
                "|---|---|---|---|---|---|---|" + ("---|" if extra else "")]
        for r in rows:
            vs = r["ms"] / ref["ms"] if ref and r.get("ms") and ref.get("ms") else None
            cells = [r["contender"] + (" (ref)" if r.get("reference") else ""), number(r.get("ms")),
                     number(r.get("x_floor"))]
            if extra:
                cells.append(number(r.get("x_matmuls")))
            cells += [number(r.get("peak_x_logits")), number(vs), number(r.get("loss"), ".6g"), r.get("note", "")]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    errors = result.get("errors", [])
    if errors:
        out += ["## Errors", ""]
        out += [f"- {e['what']}: {e['error']}" for e in errors]
        out.append("")
    return "\n".join(out)


def write_outputs(result: dict, outdir: str) -> tuple[str, str]:
    """OUTDIR/gpu-bench.json (everything) and OUTDIR/gpu-bench.md (the summary)."""
    jpath = harness.write_json(os.path.join(outdir, "gpu-bench.json"), result, default=str)
    mpath = os.path.join(outdir, "gpu-bench.md")
    with open(mpath, "w") as f:
        f.write(render_markdown(result))
    return jpath, mpath
