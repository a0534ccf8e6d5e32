"""The ``xseqloss`` command line: ``info``, ``conformance`` and ``crosscheck``.

    xseqloss info
    xseqloss conformance [--backends numpy torch ...] [--devices cpu gpu] [--json PATH] [--markdown PATH]
    xseqloss conformance --distributed [--backends torch jax] [--cases PATTERN ...]
    xseqloss crosscheck FILE.npz [--layout NCT --reduction sum ...]
    xseqloss crosscheck LOGITS.npy --targets TARGETS.npy [...]

Also ``python -m xseqloss``.  Exit status: 0 when everything agrees, 1 when a
check or a backend disagrees, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["main"]

_SIDE = ("mask", "lengths", "weights", "class_weights", "segment_ids")


def _suite() -> Any:
    """The conformance suite: ``xseqloss._conformance`` when installed, else the repository's folder."""
    try:
        return importlib.import_module("xseqloss._conformance")
    except ImportError:
        pass
    folder = Path(__file__).resolve().parent.parent / "conformance"
    if not (folder / "__init__.py").is_file():
        raise SystemExit("xseqloss: the conformance suite is not installed (no xseqloss._conformance) and no "
                         f"conformance/ folder was found next to the package ({folder})")
    # Load it under the installed name, so its relative imports resolve the same way.
    spec = importlib.util.spec_from_file_location("xseqloss._conformance", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _split(values: Sequence[str] | None) -> list[str] | None:
    """``--backends numpy torch`` and ``--backends numpy,torch`` alike."""
    if not values:
        return None
    return [v for item in values for v in item.split(",") if v]


def _quiet() -> None:
    from ._quiet import tensorflow_quietly
    tensorflow_quietly()


# --------------------------------------------------------------------------------------- info

def _info(args: argparse.Namespace) -> int:
    _quiet()
    import xseqloss as xsl
    print(f"xseqloss {getattr(xsl, '__version__', 'unknown')} ({Path(xsl.__file__).parent})")
    print(f"python {platform.python_version()} on {platform.platform()}")
    extra = []
    for name in ("ml_dtypes", "keras", "optax"):
        try:
            extra.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception:
            pass
    if extra:
        print("also installed: " + ", ".join(extra))
    found = xsl.available_backends()
    print("backends:")
    for name in ("numpy", "torch", "tensorflow", "jax"):
        if name in found:
            b = found[name]
            print(f"  {name:<11} {b.get('version', '?'):<14} devices: {', '.join(map(str, b.get('devices', [])))}")
        else:
            print(f"  {name:<11} not installed (pip install 'xseqloss[{name}]')")
    return 0


# -------------------------------------------------------------------------------- conformance

# Measured on a 2-core CPU machine with every framework (docs/conformance.md, "Run times").
SUBSET_MINUTES, FULL_MINUTES = 3, 15


def _conformance(args: argparse.Namespace) -> int:
    _quiet()
    suite = _suite()
    progress = (lambda msg: print(f"[conformance] {msg}", file=sys.stderr, flush=True))
    backends, devices = _split(args.backends), _split(args.devices)
    try:
        if args.distributed:  # only the classes-split-across-workers subset (API.md 9.2)
            report = suite.distributed_report(backends=backends, cases=args.cases, progress=progress,
                                              jobs=args.jobs)
        else:
            # the default is a representative subset (every backend, kernel, engine and check kind)
            # that finishes in a few minutes; --full runs every case (docs/conformance.md)
            subset = not (args.full or args.quick or args.cases)
            if subset:
                progress(f"a representative subset (about {SUBSET_MINUTES} min on 2 cores); --full runs every case "
                         f"(about {FULL_MINUTES} min)")
            report = suite.run(backends=backends, devices=devices, progress=progress, cases=args.cases,
                               quick=args.quick or subset, jobs=args.jobs)
            # it also runs the distributed cases on CPU workers (docs/conformance.md)
            if not (args.quick or args.cases or args.no_distributed) and \
                    (not devices or any(d.lower() == "cpu" for d in devices)):
                report = suite.merge(report, suite.run_distributed(
                    backends=backends, progress=progress, jobs=args.jobs,
                    cases=list(suite.runner.QUICK_DISTRIBUTED) if subset else None))
            report["environment"]["selection"] = "full" if args.full else "subset" if subset else "selected"
    except (ValueError, RuntimeError) as exc:
        print(f"xseqloss conformance: {exc}", file=sys.stderr)
        return 2
    if args.json:
        suite.write_json(report, args.json)
        progress(f"wrote {args.json}")
    if args.markdown:
        suite.write_markdown(report, args.markdown)
        progress(f"wrote {args.markdown}")
    print(suite.text_summary(report))
    if not report["results"]:
        print("xseqloss conformance: no checks ran (no backend and device matched the selection)",
              file=sys.stderr)
        return 1
    return 1 if suite.failures(report) else 0


# --------------------------------------------------------------------------------- crosscheck

def _load(args: argparse.Namespace) -> dict:
    path = Path(args.file)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        missing = [k for k in ("logits", "targets") if k not in arrays]
        if missing:
            raise SystemExit(f"xseqloss crosscheck: {path} has no array named {missing} "
                             f"(it has {sorted(arrays)}); save with np.savez(path, logits=..., targets=..., [mask=, lengths=, weights=, "
                             f"class_weights=, segment_ids=])")
        unknown = sorted(set(arrays) - {"logits", "targets", *_SIDE})
        if unknown:
            raise SystemExit(f"xseqloss crosscheck: unknown arrays {unknown} in {path}; allowed: logits, targets, "
                             + ", ".join(_SIDE))
    elif path.suffix == ".npy":
        if not args.targets:
            raise SystemExit("xseqloss crosscheck: a .npy file holds the logits only; give the targets with "
                             "--targets FILE.npy (or save everything in one .npz)")
        arrays = {"logits": np.load(path, allow_pickle=False)}
    else:
        raise SystemExit(f"xseqloss crosscheck: {path} is neither .npz nor .npy")
    for name in ("targets", *_SIDE):
        value = getattr(args, name, None)
        if value:
            arrays[name] = np.load(value, allow_pickle=False)
    return arrays


def _ignore_index(text: str | None) -> Any:
    if text is None:
        return -100
    if text.lower() == "none":
        return None
    values = [int(v) for v in text.split(",") if v.strip()]
    return values[0] if len(values) == 1 else tuple(values)


def _dtype_name(a: np.ndarray) -> str:
    return str(a.dtype)


def _crosscheck(args: argparse.Namespace) -> int:
    _quiet()
    suite = _suite()
    adapters = importlib.import_module(suite.__name__ + ".adapters")
    checks = importlib.import_module(suite.__name__ + ".checks")
    reference = importlib.import_module(suite.__name__ + ".reference").reference
    TOLERANCE = importlib.import_module(suite.__name__ + ".cases").TOLERANCE

    arrays = _load(args)
    logits = arrays["logits"]
    dtype = _dtype_name(logits)
    if dtype not in TOLERANCE:
        raise SystemExit(f"xseqloss crosscheck: logits have dtype {dtype}; expected one of {sorted(TOLERANCE)}")
    options: dict[str, Any] = {"layout": args.layout, "reduction": args.reduction, "denominator": args.denominator,
                               "ignore_index": _ignore_index(args.ignore_index), "inputs": args.inputs,
                               "label_smoothing": args.label_smoothing, "smoothing": args.smoothing,
                               "z_loss": args.z_loss, "logit_softcap": args.logit_softcap, "empty": args.empty,
                               "normalizer": args.normalizer, "shift": args.shift}
    if args.num_classes is not None:
        options["num_classes"] = args.num_classes
    ref_opts = {k: v for k, v in options.items() if k != "layout"}
    side = {k: arrays[k] for k in _SIDE if k in arrays}
    host = {k: v for k, v in arrays.items()}
    host["logits"] = np.asarray(logits, dtype=np.float64)  # exact: every supported dtype widens to float64
    try:
        ref_value, ref_grad = reference(host["logits"], arrays["targets"], layout=args.layout, **side, **ref_opts)
    except Exception as exc:
        print(f"reference: cannot compute ({type(exc).__name__}: {exc}); are the inputs valid?", file=sys.stderr)
        ref_value = ref_grad = None
    tol = TOLERANCE[dtype]
    shape = " x ".join(map(str, logits.shape))
    print(f"{args.file}: logits {dtype} ({shape}), layout {args.layout}, reduction {args.reduction}; "
          f"tolerance {tol:g} on |x - ref| / (1 + |ref|)")
    if ref_value is not None:
        print(f"{'reference':<22} value {_show(ref_value)}  (float64)")

    wanted = _split(args.backends)
    bad = 0
    for name, adapter in adapters.ADAPTERS.items():
        if wanted and name not in wanted:
            continue
        if not adapter.available():
            print(f"{name:<22} not installed")
            continue
        for device in adapter.devices():
            label = f"{name}/{device}"
            try:
                with adapter.context(dtype, device):
                    out = adapters.call(adapter, host, options, dtype, device)
            except Exception as exc:
                print(f"{label:<22} error: {type(exc).__name__}: {exc}")
                bad += 1
                continue
            line = f"{label:<22} value {_show(out.value)}"
            if ref_value is None and np.isnan(out.value).any():
                # the reference could not compute (an invalid input): a NaN instead of an error
                # means this backend did not say so
                bad += 1
                line += "  DISAGREES (NaN where the reference found the input invalid)"
            if ref_value is not None:
                dv = float(np.nanmax(np.abs(out.value - ref_value))) if out.value.size and \
                    out.value.shape == ref_value.shape else float("inf")
                ev = checks.metric(out.value, ref_value)
                eg = checks.metric(out.grad, ref_grad) if out.grad is not None else float("inf")
                ok = ev <= tol and eg <= tol
                bad += not ok
                line += (f"  |value - ref| {dv:.3g}  worst gradient error {eg:.3g}  "
                         f"{'ok' if ok else 'DISAGREES'}")
                if out.grad_error:
                    line += f" ({out.grad_error})"
            print(line)
    return 1 if bad else 0


def _show(v: np.ndarray) -> str:
    v = np.asarray(v)
    if v.ndim == 0:
        return f"{float(v):.10g}"
    return f"shape {v.shape}, sum {float(np.nansum(v)):.10g}, first {np.array2string(v.ravel()[:4], precision=6)}"


# --------------------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xseqloss", description="One sequence cross-entropy on NumPy, PyTorch, "
                                "TensorFlow and JAX.")
    sub = p.add_subparsers(dest="command", metavar="{info,conformance,crosscheck}")
    sub.required = True

    sub.add_parser("info", help="backends, versions and devices")

    c = sub.add_parser("conformance", help="run the conformance suite on every installed backend and device")
    c.add_argument("--backends", nargs="+", metavar="NAME",
                   help="backends to run (default: every installed one): numpy torch tensorflow jax")
    c.add_argument("--devices", nargs="+", metavar="DEVICE",
                   help="devices to run: cpu, gpu (or cuda), or a label such as cuda:0 (default: all found)")
    c.add_argument("--json", metavar="PATH", help="write every result as JSON")
    c.add_argument("--markdown", metavar="PATH", help="write the Markdown report")
    c.add_argument("--cases", nargs="+", metavar="PATTERN",
                   help="only the base cases matching these fnmatch patterns or substrings (skips the error "
                        "catalogue)")
    c.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                   help="backends run at once, each in its own process (default: 2, or 1 on one CPU)")
    split = c.add_mutually_exclusive_group()
    split.add_argument("--distributed", action="store_true",
                       help="only the subset with the class axis split across workers (class_parallel: 2 and 3 "
                            "torch gloo processes, 4 JAX host devices under shard_map and jit); the full report "
                            "(no --cases or --quick) runs it too")
    split.add_argument("--no-distributed", action="store_true",
                       help="leave the class-split subset out of the full report")
    size = c.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help=f"every case (about {FULL_MINUTES} min on 2 cores; CI and the report in docs/conformance/ "
                           f"use it); the default is a representative subset (about {SUBSET_MINUTES} min)")
    size.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # a small subset, for tests

    x = sub.add_parser("crosscheck", help="run saved arrays through every backend against the float64 reference",
                       description="FILE is an .npz holding logits and targets (and optionally mask, lengths, "
                                   "weights, class_weights), or an .npy holding the logits with --targets.")
    x.add_argument("file", metavar="FILE")
    x.add_argument("--targets", metavar="NPY", help="targets (.npy), required with a .npy FILE")
    for name in _SIDE:
        x.add_argument("--" + name.replace("_", "-"), dest=name, metavar="NPY", help=f"{name} (.npy)")
    x.add_argument("--backends", nargs="+", metavar="NAME", help="backends to run (default: every installed one)")
    x.add_argument("--layout", default="NTC")
    x.add_argument("--reduction", default="mean")
    x.add_argument("--denominator", default="weights")
    x.add_argument("--ignore-index", metavar="INT[,INT...]|none", help="default -100")
    x.add_argument("--label-smoothing", type=float, default=0.0)
    x.add_argument("--smoothing", default="uniform")
    x.add_argument("--z-loss", type=float, default=0.0)
    x.add_argument("--logit-softcap", type=float, default=None)
    x.add_argument("--inputs", default="logits")
    x.add_argument("--empty", default="zero")
    x.add_argument("--normalizer", type=float, default=None)
    x.add_argument("--num-classes", type=int, default=None)
    x.add_argument("--shift", type=int, default=0, help="next-token prediction: score logits at t against "
                                                        "the target at t + SHIFT")
    return p


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--ignore-index -100,2`` as ``--ignore-index=-100,2``: argparse takes a value that starts
    with '-' and is not a plain negative number for an option and refuses it."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in _NEGATIVE_OK:
            nxt = next(it, None)
            if nxt is not None and nxt.startswith("-") and nxt[1:2].isdigit():
                out.append(f"{a}={nxt}")
                continue
            out.append(a)
            if nxt is not None:
                out.append(nxt)
            continue
        out.append(a)
    return out


_NEGATIVE_OK = ("--ignore-index", "--normalizer")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 disagreement or failure, 2 usage error)."""
    try:
        args = _parser().parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return int(exc.code or 0)
    try:
        return {"info": _info, "conformance": _conformance, "crosscheck": _crosscheck}[args.command](args)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # our own usage errors carry a message; keep argparse's codes
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return int(exc.code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
