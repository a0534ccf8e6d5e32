"""The "stats" check kind across devices (API.md 11.4, 9.2): ``token_stats(..., class_parallel=...)``
with the class axis split over workers, against the float64 reference of stats_reference.py.

The cases are the single-device stats cases (stats_cases.py) named in ``SHARDED_STATS_CASES`` plus
``TP_STATS_CASES`` (C = 8 and 12: shard_map without padding), built by the same
``stats_cases.make_stats_inputs`` (index targets or none, logits inputs: the only kind token_stats
takes), their dtypes narrowed to distributed.DTYPES. Every engine of distributed.py runs them:

* torch gloo ranks (uneven slices, ``distributed.torch_slices``): ``token_stats(local_logits, ...,
  class_parallel=group.WORLD)``, the VJP by torch autograd (stats_checks._call);
* JAX ``shard_map`` (``class_parallel="tp"``, outputs typed replicated with ``out_specs=P()``; a C that
  does not divide by the devices padded with junk 0.5 and ``num_classes=C``), and plain ``jax.jit``
  over class-sharded logits (``with_sharding_constraint`` where C does not divide), the VJP by
  ``jax.vjp`` of the whole (jitted) function.

Targets, ids, temperatures and the token arrays are global on every worker. Rows (case
"stats:<name>/<dtype>", the record format of checks.record):

* "stats": every worker's copy of every output asked for (and ``counted``) against the reference,
  by stats_checks.compare_outputs (float outputs within the dtype's tolerance, argmax over global
  indices, correct and counted exactly, dtypes), every worker present, padding columns with a zero
  gradient;
* "stats_replicated": every worker's copy of every output bitwise the same (exact);
* "stats_vjp": d sum_k sum(cotangent_k * output_k) under the case's random cotangents, each worker's
  gradient against its slice of the reference gradient (distributed_checks._pieces_error), in the
  input's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import numpy as np

from .adapters import ADAPTERS
from .checks import _short, expected_dtype, record
from .distributed_checks import DTYPES, _pieces_error, select_specs
from .stats_cases import STATS_CASES, _s, make_stats_inputs
from .stats_checks import FIELDS, _call, compare_outputs, stats_reference_of


# Single-device stats cases that run split (each has C >= 3, so every rank of 3 holds a class):
SHARDED_STATS_CASES = (
    # layouts and temperature forms (a number, one per sequence, one per token)
    "st_ntc", "st_nct_t05", "st_tnc_t15_mask", "st_nc_temp_sequence", "st_c_t05", "st_temp_token_mask",
    "st_temp_sequence_lengths",
    # ids over global indices, with and without targets
    "st_ids3_tnc_shift_t05", "st_ids3_no_targets",
    # which tokens count, shift and packed documents
    "st_mask_lengths_ignore", "st_ignore_collection", "st_segments_shift1",
    # softcap before the temperature; edge values; argmax ties; garbage where nothing counts
    "st_softcap_t05", "st_neginf_t05", "st_masked_vocab_ids", "st_all_negative_t05", "st_confident",
    "st_ties_t15_nct", "st_garbage",
    # a 32,000-class vocabulary
    "st_vocab32k_nct_softcap",
)

# Cases whose C divides by the 4 JAX devices (no padding under shard_map).
TP_STATS_CASES: list[dict[str, Any]] = [
    _s("tp_st_c8_temp_token_ids", "NTC", dict(N=2, T=4, C=8), temperature="token", ids=2, mask=0.25),
    _s("tp_st_c12_nct_shift_softcap", "NCT", dict(N=2, T=5, C=12), temperature=1.5, lengths="random",
       options=dict(shift=1, logit_softcap=4.0)),
]


def stats_specs(patterns: Iterable[str] | None = None) -> list[dict]:
    """The distributed stats cases, dtypes narrowed to DTYPES; ``patterns`` as distributed.specs."""
    return select_specs(STATS_CASES, SHARDED_STATS_CASES, TP_STATS_CASES, patterns)


def stats_plan(engine: str, specs_: list[dict], dtypes: Iterable[str] = DTYPES) -> list[tuple[dict, str]]:
    """(spec, dtype) pairs ``engine`` runs (every torch rank holds a class; JAX pads)."""
    def runs(s):
        C = s["shape"]["C"]
        return C >= int(engine.split("-")[1]) if engine.startswith("torch-") else C >= 2
    return [(s, dt) for s in specs_ if runs(s) for dt in s["dtypes"] if dt in dtypes]


def key(case_name: str) -> str:
    """The case name of the rows and of the workers' outcomes ("stats:<name>/<dtype>")."""
    return f"stats:{case_name}"


def local_case(case: Any, lo: int, hi: int, **options: Any) -> Any:
    """One worker's case: the logits cut to classes [lo, hi), options added (class_parallel)."""
    k = case.layout.index("C")
    cut = tuple(slice(lo, hi) if i == k else slice(None) for i in range(case.arrays["logits"].ndim))
    return dataclasses.replace(case, arrays=dict(case.arrays, logits=case.arrays["logits"][cut]),
                               options=dict(case.options, **options))


# ------------------------------------------------------------------------------------ the workers

def torch_stats(rank: int, world: int, group: Any, engine: str, chosen: list[dict], dtypes: tuple) -> dict:
    """One gloo rank's outcomes of every stats case: {key: outcome}."""
    from .distributed import class_index, torch_slices
    adapter = ADAPTERS["torch"]
    worker = f"rank {rank} of {world}"
    got = {}
    for spec, dt in stats_plan(engine, chosen, dtypes):
        case = make_stats_inputs(spec, dt)
        sizes = torch_slices(spec["shape"]["C"], world, spec["name"])
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        try:
            out, dts, g, gdt = _call(adapter, local_case(case, lo, hi, class_parallel=group), "cpu")
            pieces = [] if g is None else [dict(worker=worker, index=class_index(case, lo, hi), grad=g[0],
                                                dtype=gdt[0])]
            got[key(case.name)] = dict(copies=[(worker, out, dts)], pieces=pieces)
        except Exception as exc:  # noqa: BLE001 - recorded as a failing row
            got[key(case.name)] = {"error": f"{worker}: " + _short(exc)}
    return got


def jax_stats(engine: str, chosen: list[dict], dtypes: tuple, mesh: Any, shard_map: Any, put: Any) -> dict:
    """The outcomes of every stats case on one JAX engine ("jax-shard_map" or "jax-jit")."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import xseqloss as xsl

    from .distributed_workers import _jax_pieces, _padded
    adapter = ADAPTERS["jax"]
    devices = mesh.devices.size
    got = {}
    for spec, dt in stats_plan(engine, chosen, dtypes):
        case = make_stats_inputs(spec, dt)
        C, layout = spec["shape"]["C"], case.layout
        k = layout.index("C")
        zspec = P(*[("tp" if a == "C" else None) for a in layout])
        even = C % devices == 0
        pad = 0 if (even or engine != "jax-shard_map") else -C % devices
        opts = {n: v for n, v in case.options.items()}
        if pad:
            opts["num_classes"] = C  # the columns from C on are vocabulary padding
        keys = list(case.cotangents)
        try:
            with adapter.context(dt, "cpu"):
                z = put(_padded(case.arrays["logits"], k, pad, 0.5), dt,
                        zspec if (engine == "jax-shard_map" or even) else P())
                args = {n: put(v, expected_dtype(dt) if n == "temperature" else None, P())
                        for n, v in case.arrays.items() if n != "logits"}  # targets and side arrays: global
                if engine == "jax-shard_map":
                    def local(z, args):
                        return xsl.token_stats(z, args.pop("targets", None), class_parallel="tp", **args, **opts)
                    stats_fn = shard_map(local, mesh=mesh, in_specs=(zspec, {n: P() for n in args}), out_specs=P())
                else:
                    constrain = NamedSharding(mesh, zspec)

                    def stats_fn(z, args):
                        if not even:  # device_put refuses an indivisible sharding; XLA pads this one
                            z = jax.lax.with_sharding_constraint(z, constrain)
                        return xsl.token_stats(z, args.pop("targets", None), **args, **opts)

                def vjp(z, args, cts):
                    if not keys:
                        return stats_fn(z, dict(args)), None
                    outs, pull, s = jax.vjp(lambda z: _picked(stats_fn(z, dict(args)), keys), z, has_aux=True)
                    return s, pull(tuple(c.astype(o.dtype) for c, o in zip(cts, outs)))[0]

                cts = tuple(jax.device_put(jnp.asarray(np.asarray(case.cotangents[n]), dtype=expected_dtype(dt)),
                                           NamedSharding(mesh, P())) for n in keys)
                s, g = jax.jit(vjp)(z, args, cts)
                copies: dict[str, tuple] = {}
                for f in FIELDS:
                    v = getattr(s, f)
                    for sh in ([] if v is None else v.addressable_shards):
                        w = f"device {sh.device.id}"
                        copies.setdefault(w, (w, {n: None for n in FIELDS}, {n: None for n in FIELDS}))
                        copies[w][1][f] = adapter.host(sh.data)
                        copies[w][2][f] = str(sh.data.dtype)
                o: dict = dict(copies=list(copies.values()), pieces=[])
                if g is not None:
                    pieces = _jax_pieces(g, adapter, k, C)
                    o.update(padding_ok=pieces is not None,
                             pieces=[dict(p, dtype=str(g.dtype)) for p in pieces or []])
        except Exception as exc:  # noqa: BLE001 - recorded as a failing row
            o = {"error": _short(exc)}
        got[key(case.name)] = o
    return got


def _picked(s: Any, keys: list) -> tuple:
    return tuple(getattr(s, n) for n in keys), s


# ------------------------------------------------------------------------------------ the comparison

def check_sharded_stats(backend: str, device: str, engine: str, case: Any, ref: tuple, out: dict,
                        workers: int | None = None) -> list[dict]:
    """The rows of one stats case on one multi-worker engine. ``ref``: stats_checks.stats_reference_of;
    ``out``: ``copies`` [(worker, outputs, dtypes)] (every worker's copy of every field, host NumPy
    or None), ``pieces`` [{"worker", "index", "grad", "dtype"}], ``padding_ok`` (False: a padding
    column's gradient is not 0) and ``error``. ``workers``: how many copies there must be."""
    dt, tol = case.dtype, case.tolerance
    rows: list[dict] = []
    rec = (lambda check, err, detail="", t=tol:
           rows.append(record(backend, device, dt, key(case.name), check, err, t, detail, engine)))
    want, want_g = ref
    copies = out.get("copies") or []
    if out.get("error") or not copies:
        why = out.get("error") or "no worker returned a result"
        rec("stats", math.inf, why)
        if case.cotangents:
            rec("stats_vjp", math.inf, why)
        return rows

    adapter = ADAPTERS[backend]
    problems, worst, who = [], 0.0, ""  # problems: what makes the row fail whatever the error
    if workers is not None and len(copies) != workers:
        problems.append(f"{len(copies)} of {workers} workers returned outputs")
    if out.get("padding_ok") is False:  # shard_map with a padded vocabulary
        problems.append("a padding column's gradient is not exactly 0")
    details = []
    for worker, got, dts in copies:
        err, detail = compare_outputs(adapter, case, got, dts, want)  # inf: something exact did not hold
        if detail:
            details.append(f"{worker}: {detail}")
        if err > worst or not who:
            worst, who = err, worker
    rec("stats", math.inf if problems else worst, "; ".join((problems + details)[:4]) or f"worst: {who}")

    first = copies[0][1]
    differ = [f for f in FIELDS if not all(_same(c[1][f], first[f]) for c in copies)]
    rec("stats_replicated", 1.0 if differ else 0.0,
        f"the workers' {', '.join(differ)} differ" if differ else f"{len(copies)} copies bitwise equal", t=0.0)

    if case.cotangents:
        pieces = out.get("pieces") or []
        bad_dtype = sorted({p["dtype"] for p in pieces if p.get("dtype") != dt})
        err, gwho = _pieces_error(pieces, want_g[0]) if pieces else (math.inf, "no gradient")
        rec("stats_vjp", math.inf if bad_dtype else err,
            f"gradient dtype {', '.join(bad_dtype)}, expected {dt}" if bad_dtype else f"worst: {gwho}")
    return rows


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind != "f":
        return bool(np.array_equal(a, b))
    return bool(np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(b)))


def references(specs_: list[dict], needed: Iterable[tuple[str, str]]) -> dict:
    """{(name, dtype): (case, (outputs, gradients))} of the float64 reference."""
    by_name = {s["name"]: s for s in specs_}
    out = {}
    for name, dt in sorted(set(needed)):
        case = make_stats_inputs(by_name[name], dt)
        out[(name, dt)] = (case, stats_reference_of(case))
    return out
