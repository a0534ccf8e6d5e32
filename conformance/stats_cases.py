"""The declarative cases of the "stats" check kind: ``token_stats`` and ``linear_token_stats``
(API.md 11), in the style of cases.py.

A case is data.  ``make_stats_inputs(spec, dtype)`` turns one (case, dtype) into concrete NumPy
arrays, deterministically from the case name: the logits, targets, mask, lengths, segment ids and
garbage come from ``cases.make_case`` (so they follow the loss suite's rules, low-precision logits
rounded to their dtype first), and this module adds what is new in section 11: the temperature
(a number, a 0-d array, one per sequence, one per token), the ids (k = 1 or 3), a few logit
patterns of its own, the value problems, and a random cotangent for every differentiable output.
The float64 reference (stats_reference.py) is computed on the already rounded inputs.

Keys of a base case (everything but ``name`` is optional; ``layout`` "NTC" and ``shape``
cases.S by default):

``targets``      "index" (default) or "none" (``token_stats(logits, None, ...)``)
``logits``       a kind of cases.py ("normal", "big", "big_near_max", "neginf", "masked_vocab",
                 "uniform") or one of this module: "negative" (every logit near -40: the verl
                 max-identity bug), "confident" (p(y) -> 1: the target 12, 20 or 30 above the
                 rest), "ties" (multiples of 0.5 with the row's maximum at classes 1 and 3, the
                 target on either: argmax ties, correct both ways)
``mask``, ``lengths``, ``ignore``, ``segments``  as in cases.py
``garbage``      True: NaN / +inf / -inf in the logits' rows of every position that does not
                 count, NaN in a per-token temperature and out-of-range ids at the target
                 positions that no counted step reads (never read, so no error)
``temperature``  a number (an option), "scalar_array" (a 0-d array of 1.5), "sequence" (an (N,)
                 array) or "token" (the targets' token shape, read at the target position t + shift)
``ids``          k: ids of the targets' token shape + (k,)
``outputs``      the outputs asked for (default: every one that applies)
``cotangents``   the differentiable outputs that get a cotangent (default: all asked for; the
                 others count as zero)
``bad``          a value problem at a counted position: "target" (= C), "target_negative" (-1),
                 "id" (= C + 3), "temperature_token" (0, NaN and -1.5 at three read positions),
                 "temperature_sequence" (inf for a sequence with counted tokens).  The reference
                 raises ValueError; the package must raise XSeqLossError eagerly, and with
                 validate=False give the reference's ``nan_marks=True`` result.
``options``      shift, ignore_index, logit_softcap: keyword options passed unchanged
``dtypes``       the dtypes to run (default all four)
``jit``          True: also compare jax.jit / tf.function(jit_compile=True) / torch.compile

``LINEAR_STATS_CASES`` are the fused layer's: hidden states, a weight in either layout, maybe a
bias, built by linear.make (conformance/linear.py), plus the keys above.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import linear as linear_cases
from .cases import DTYPES, MIDDLE_DTYPES, S, TOLERANCE, VL_DTYPES, _write_garbage, make_case, read_targets, round_to
from .reference import counted_positions
from .stats_reference import DIFFERENTIABLE, OUTPUTS

TEMPERATURES = np.array([0.5, 0.75, 1.0, 1.25, 1.5, 2.0])  # exact in every dtype
BAD_DTYPES = ("float32",)
LOSS_KINDS = ("normal", "big", "big_near_max", "huge_near_max", "neginf", "masked_vocab", "uniform")
STATS_KINDS = ("negative", "confident", "ties")


def _s(name, layout="NTC", shape=None, **kw):
    return dict(name=name, layout=layout, shape=dict(shape or S), **kw)


STATS_CASES: list[dict[str, Any]] = [
    # ---------------------------------------------------------------- layouts, temperature forms
    _s("st_ntc", "NTC", dict(N=2, T=3, C=5), jit=True),
    _s("st_nct_t05", "NCT", dict(N=2, T=3, C=5), temperature=0.5, jit=True),
    _s("st_tnc_t15_mask", "TNC", dict(N=2, T=3, C=5), temperature=1.5, mask=0.3),
    _s("st_nc_temp_sequence", "NC", dict(N=4, C=6), temperature="sequence"),
    _s("st_c_t05", "C", dict(C=7), temperature=0.5),
    _s("st_c_temp_0d", "C", dict(C=7), temperature="scalar_array"),
    _s("st_tc_temp_token_shift", "TC", dict(T=5, C=4), temperature="token", options=dict(shift=1),
       dtypes=VL_DTYPES),
    _s("st_temp_0d", temperature="scalar_array", mask=0.2),
    _s("st_temp_sequence_lengths", temperature="sequence", lengths="random", jit=True),
    _s("st_temp_token_mask", temperature="token", mask=0.25, jit=True),
    _s("st_temp_token_shift", temperature="token", options=dict(shift=1), dtypes=MIDDLE_DTYPES, jit=True),
    # ---------------------------------------------------------------- ids (top-k distillation)
    _s("st_ids1_t15", ids=1, temperature=1.5, jit=True),
    _s("st_ids3_tnc_shift_t05", "TNC", ids=3, mask=0.2, temperature=0.5, options=dict(shift=1),
       dtypes=MIDDLE_DTYPES),
    _s("st_ids3_no_targets", targets="none", ids=3, temperature="token"),
    _s("st_ids3_vocab32k", "NTC", dict(N=2, T=3, C=32000), ids=3, temperature=1.5, ignore=0.2,
       dtypes=("float32", "bfloat16")),
    _s("st_vocab32k_nct_softcap", "NCT", dict(N=2, T=3, C=32000), temperature="token",
       options=dict(logit_softcap=30.0), dtypes=("float32", "bfloat16")),
    # ---------------------------------------------------------------- which tokens count
    _s("st_mask_lengths_ignore", mask=0.2, lengths="random", ignore=0.2, temperature=1.5),
    _s("st_ignore_collection", ignore=0.3, options=dict(ignore_index=(-100, 3))),
    _s("st_ignore_in_range", ignore=0.3, options=dict(ignore_index=0), temperature=0.5),
    _s("st_ignore_none", options=dict(ignore_index=None)),
    _s("st_all_masked", mask="all", temperature="token"),
    _s("st_lengths_zero", lengths="with_zero", temperature="sequence"),
    _s("st_no_targets", targets="none", mask=0.3, lengths="random", temperature=0.5, jit=True),
    # ---------------------------------------------------------------- shift and packed documents
    _s("st_shift1", mask=0.2, lengths="random", options=dict(shift=1), jit=True, dtypes=MIDDLE_DTYPES),
    _s("st_shift2_ids_temp_token", ids=1, temperature="token", options=dict(shift=2), dtypes=VL_DTYPES),
    _s("st_segments_shift1", "NTC", dict(N=2, T=9, C=5), segments="random", ignore=0.1, temperature="token",
       options=dict(shift=1), jit=True, dtypes=VL_DTYPES),
    _s("st_segments_lengths_shift2_tnc", "TNC", dict(N=2, T=9, C=4), segments="random", lengths="random",
       temperature="sequence", options=dict(shift=2), dtypes=VL_DTYPES),
    _s("st_no_targets_shift_segments", "NTC", dict(N=2, T=9, C=5), targets="none", segments="random",
       temperature="token", options=dict(shift=1), dtypes=VL_DTYPES),
    # ---------------------------------------------------------------- softcap (before the temperature)
    _s("st_softcap_t05", temperature=0.5, options=dict(logit_softcap=5.0), jit=True),
    _s("st_softcap_big_ties", logits="big", temperature=1.5, options=dict(logit_softcap=3.0)),
    _s("st_softcap_shift_temp_token", mask=0.2, temperature="token", options=dict(logit_softcap=4.0, shift=1),
       dtypes=VL_DTYPES),
    # ---------------------------------------------------------------- edge values
    _s("st_neginf_t05", logits="neginf", mask=0.2, temperature=0.5, ids=3),
    _s("st_masked_vocab_ids", logits="masked_vocab", ids=3, temperature=1.5, jit=True, dtypes=MIDDLE_DTYPES),
    _s("st_masked_vocab_softcap", logits="masked_vocab", temperature="token", options=dict(logit_softcap=5.0),
       dtypes=VL_DTYPES),
    _s("st_all_negative_t05", logits="negative", temperature=0.5),
    _s("st_all_negative_ids", logits="negative", ids=3, temperature="sequence"),
    _s("st_big", logits="big"),
    _s("st_big_near_max_t05", logits="big_near_max", temperature=0.5, dtypes=MIDDLE_DTYPES),
    _s("st_confident", logits="confident", jit=True),
    _s("st_confident_t05", logits="confident", temperature=0.5, ids=3, dtypes=("float32", "bfloat16")),
    _s("st_ties", logits="ties"),
    _s("st_ties_t15_nct", "NCT", logits="ties", temperature=1.5),
    _s("st_uniform", logits="uniform", temperature=1.5),
    _s("st_c1", "NTC", dict(N=2, T=3, C=1), temperature=0.5),
    _s("st_c2_temp_token", "NTC", dict(N=2, T=3, C=2), temperature="token", mask=0.2),
    # ---------------------------------------------------------------- garbage where nothing counts
    _s("st_garbage", mask=0.3, lengths="random", ignore=0.2, garbage=True, temperature="token", ids=3, jit=True),
    _s("st_garbage_shift_segments", "NTC", dict(N=2, T=9, C=5), segments="random", garbage=True,
       temperature="token", ids=1, options=dict(shift=1), dtypes=VL_DTYPES),
    _s("st_garbage_no_targets", targets="none", mask=0.3, lengths="random", garbage=True,
       temperature="sequence"),
    # ---------------------------------------------------------------- which upstream gradients
    _s("st_entropy_cotangent_only", temperature=0.5, cotangents=("entropy",)),
    _s("st_ppo_pair", outputs=("log_prob", "entropy"), mask=0.2, temperature=1.5, jit=True),
    _s("st_lse_ids_cotangents", ids=3, cotangents=("lse", "ids_log_prob"), temperature="sequence"),
    _s("st_no_differentiable", outputs=("argmax", "correct")),
    # ---------------------------------------------------------------- value problems at counted tokens
    _s("st_bad_target", bad="target", mask=0.2, dtypes=BAD_DTYPES, jit=True),
    _s("st_bad_target_negative_shift", bad="target_negative", options=dict(shift=1), dtypes=BAD_DTYPES),
    _s("st_bad_id", bad="id", ids=3, dtypes=BAD_DTYPES, jit=True),
    _s("st_bad_id_no_targets", targets="none", bad="id", ids=1, dtypes=BAD_DTYPES),
    _s("st_bad_temperature_token", bad="temperature_token", temperature="token", dtypes=BAD_DTYPES, jit=True),
    _s("st_bad_temperature_sequence", bad="temperature_sequence", temperature="sequence", lengths="random",
       dtypes=BAD_DTYPES),
]

# The fused layer: linear.make's keys (layout, shape, bias, weight_layout, mask, lengths, ignore,
# segments (NTH with T = 9), confident) plus the stats keys above; ``chunk`` is the chunk size.
LINEAR_STATS_CASES: list[dict[str, Any]] = [
    dict(name="lst_plain_t15", layout="NTH", chunk=3, temperature=1.5),
    dict(name="lst_bias_hc_ids_shift", layout="NTH", weight_layout="HC", bias=True, chunk=4, ids=3,
         temperature="token", options=dict(shift=1)),
    dict(name="lst_tnh_mask_softcap", layout="TNH", bias=True, chunk=5, mask=0.25, lengths=True, ignore=0.2,
         temperature=0.5, options=dict(logit_softcap=5.0)),
    dict(name="lst_nh_temp_sequence", layout="NH", shape=dict(N=9, H=6, C=7), chunk=2, temperature="sequence",
         cotangents=("entropy",)),
    dict(name="lst_h_single", layout="H", shape=dict(H=6, C=7), chunk=1, temperature=0.5),
    dict(name="lst_no_targets_segments", layout="NTH", shape=dict(N=2, T=9, H=5, C=6), chunk=4, targets="none",
         segments=True, temperature="token", options=dict(shift=1)),
    dict(name="lst_garbage", layout="NTH", shape=dict(N=3, T=6, H=5, C=7), chunk=4, mask=0.2, ignore=0.2,
         lengths=True, bias=True, garbage=True, ids=1, temperature="token"),
    dict(name="lst_confident", layout="NTH", chunk=4, confident=True, temperature=0.5,
         dtypes=("float32", "bfloat16")),
]


@dataclass
class StatsCase:
    """One base case at one dtype, with its concrete arrays (NumPy; floats as float64 holding values
    already rounded to ``dtype``)."""
    name: str                      # "<base>/<dtype>"
    base: str
    dtype: str
    layout: str                    # the logits' layout (the hidden states' for a fused-layer case)
    options: dict                  # static keyword options: outputs, temperature (a number), shift, ...
    arrays: dict                   # logits (or hidden, weight, bias), targets (absent: None), side arrays
    cotangents: dict               # differentiable output name -> float64 array of its shape
    bad: str | None = None
    jit: bool = False
    linear: bool = False
    chunk_size: int | None = None
    weight_layout: str = "CH"
    spec: dict = field(default_factory=dict)

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]

    @property
    def targets(self) -> np.ndarray | None:
        return self.arrays.get("targets")

    def kwargs(self) -> dict:
        """Keyword options and side arrays (NumPy) for the reference and for the package, layout
        excluded (chunk_size and weight_layout excluded too: see ``linear_kwargs``)."""
        kw = {k: v for k, v in self.options.items() if k != "layout"}
        for k in SIDE_ARRAYS:
            if k in self.arrays:
                kw[k] = self.arrays[k]
        return kw

    def linear_kwargs(self) -> dict:
        """The fused layer's extra keywords: bias, layout and weight_layout (the reference's)."""
        return dict(bias=self.arrays.get("bias"), layout=self.layout, weight_layout=self.weight_layout)


SIDE_ARRAYS = ("mask", "lengths", "segment_ids", "temperature", "ids")


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32((name + "/stats").encode()))


def _default_outputs(has_targets: bool, has_ids: bool) -> tuple:
    outs = [o for o in OUTPUTS if o != "ids_log_prob" and (has_targets or o not in ("log_prob", "correct"))]
    if has_ids:
        outs.append("ids_log_prob")
    return tuple(outs)


def _token_iter(layout: str, tok_shape: tuple, shift: int):
    """(logits' token index, target-side token index) of every step whose target step exists
    along T (documents aside); layout is the logits' (or hidden states') layout."""
    tl = [a for a in layout if a in "NT"]
    N = tok_shape[tl.index("N")] if "N" in tl else 1
    T = tok_shape[tl.index("T")] if "T" in tl else 1
    for n in range(N):
        for t in range(T - shift):
            yield (tuple(n if a == "N" else t for a in tl), tuple(n if a == "N" else t + shift for a in tl))


def _stats_logits(kind: str, z: np.ndarray, y: np.ndarray, rng: np.random.Generator, dtype: str):
    """This module's logit kinds on class-last logits z (token shape + (C,)); returns (z, y)."""
    C = z.shape[-1]
    if kind == "negative":
        z = rng.normal(-40.0, 2.0, size=z.shape)
    elif kind == "confident":
        z = rng.normal(0.0, 1.0, size=z.shape)
        margin = np.resize(np.array([12.0, 20.0, 30.0]), y.shape) if y.ndim else np.array(20.0)
        onehot = (np.arange(C) == np.where(y < 0, 0, y)[..., None]) & (y[..., None] >= 0)
        z = z + np.where(onehot, margin[..., None], 0.0)
    elif kind == "ties":
        z = rng.integers(-2, 3, size=z.shape) * 0.5
        z[..., 1] = 2.0
        z[..., 3] = 2.0
        alt = (np.arange(y.size).reshape(y.shape) % 2 == 1)
        y = np.where(y < 0, y, np.where(alt, 3, 1))  # argmax 1: correct on even tokens, not on odd
    return round_to(z, dtype), y


def _fix_ids(ids: np.ndarray, z: np.ndarray, layout: str, shift: int) -> np.ndarray:
    """Ids that would pick a -inf logit of the row that reads them are moved to that row's largest
    logit (a -inf log-probability is valid but not what these cases test)."""
    ids = ids.copy()
    for ti, si in _token_iter(layout, z.shape[:-1], shift):
        row = z[ti]
        for j in range(ids.shape[-1]):
            if not np.isfinite(row[ids[si + (j,)]]):
                ids[si + (j,)] = int(np.argmax(np.where(np.isnan(row), -np.inf, row)))
    return ids


def _add_stats_inputs(spec: dict, arrays: dict, tok_shape: tuple, C: int, N: int, rng: np.random.Generator,
                      options: dict, class_last: np.ndarray | None, layout: str) -> None:
    """Temperature, ids, and the options they imply (in place)."""
    temp = spec.get("temperature", 1.0)
    if isinstance(temp, str):
        if temp == "scalar_array":
            arrays["temperature"] = np.array(1.5)
        elif temp == "sequence":
            arrays["temperature"] = rng.choice(TEMPERATURES, size=N)
        elif temp == "token":
            arrays["temperature"] = rng.choice(TEMPERATURES, size=tok_shape)
        else:
            raise ValueError(f"unknown temperature form {temp!r}")
    else:
        options["temperature"] = float(temp)
    k = spec.get("ids")
    if k:
        ids = rng.integers(0, C, size=tok_shape + (k,)).astype(np.int64)
        if class_last is not None:
            ids = _fix_ids(ids, class_last, layout, options.get("shift", 0))
        arrays["ids"] = ids


def _counted_and_read(arrays: dict, layout: str, options: dict, tok_shape: tuple) -> tuple:
    """(counted logits' positions, target positions some counted step reads), token shape."""
    tg = arrays.get("targets")
    ignore = options.get("ignore_index", -100)
    if tg is None:
        tg, ignore = np.zeros(tok_shape, np.int64), None
    kw = dict(layout=layout, mask=arrays.get("mask"), lengths=arrays.get("lengths"), ignore_index=ignore,
              shift=options.get("shift", 0), segment_ids=arrays.get("segment_ids"))
    return counted_positions(tg, **kw), counted_positions(tg, at_targets=True, **kw)


def _bad(spec: dict, arrays: dict, read: np.ndarray, counted: np.ndarray, C: int, layout: str) -> None:
    """A value problem at positions a counted step reads (in place)."""
    where = [tuple(int(v) for v in i) for i in np.argwhere(read)]
    if not where:
        raise ValueError(f"{spec['name']}: no counted position to put a bad value at")
    bad = spec["bad"]
    if bad == "target":
        arrays["targets"][where[0]] = C
    elif bad == "target_negative":
        arrays["targets"][where[-1]] = -1
    elif bad == "id":
        arrays["ids"][where[0] + (arrays["ids"].shape[-1] - 1,)] = C + 3
    elif bad == "temperature_token":
        for i, v in zip(where, (0.0, np.nan, -1.5)):
            arrays["temperature"][i] = v
    elif bad == "temperature_sequence":
        tl = [a for a in layout if a in "NT"]
        n = int(np.argwhere(counted)[0][tl.index("N")])
        arrays["temperature"][n] = np.inf
    else:
        raise ValueError(f"unknown bad value {bad!r}")


def _garbage_side(arrays: dict, unread: np.ndarray, C: int) -> None:
    """NaN temperatures and out-of-range ids at the target positions no counted step reads."""
    if "temperature" in arrays and arrays["temperature"].shape == unread.shape and unread.ndim:
        temp = arrays["temperature"].copy()
        temp[unread] = np.resize(np.array([np.nan, 0.0, -np.inf]), int(unread.sum()))
        arrays["temperature"] = temp
    if "ids" in arrays:
        ids = arrays["ids"].copy()
        ids[unread] = np.resize(np.array([C + 7, -1, -100]), ids[unread].shape)
        arrays["ids"] = ids


def _cotangents(spec: dict, outputs: tuple, shapes: dict, rng: np.random.Generator) -> dict:
    names = spec.get("cotangents", tuple(o for o in outputs if o in DIFFERENTIABLE))
    out = {}
    for name in names:
        ct = rng.integers(-4, 5, size=shapes[name]) / 4.0
        if ct.size and not ct.any():
            ct.flat[0] = 1.0
        out[name] = ct
    return out


def make_stats_inputs(spec: dict, dtype: str) -> StatsCase:
    """Concrete arrays for one base case at one dtype (deterministic in the case name)."""
    if "weight_layout" in spec or spec["layout"].count("H"):
        return _make_linear(spec, dtype)
    layout = spec["layout"]
    kind = spec.get("logits", "normal")
    opts = dict(spec.get("options", {}))
    loss_spec = {k: spec[k] for k in ("name", "layout", "shape", "mask", "lengths", "ignore", "segments")
                 if k in spec}
    loss_spec["logits"] = kind if kind in LOSS_KINDS else "normal"
    loss_spec["options"] = {k: v for k, v in opts.items() if k in ("shift", "ignore_index")}
    if spec.get("targets", "index") == "none":
        loss_spec.pop("ignore", None)
    case = make_case(loss_spec, dtype)  # rounded logits, targets, mask, lengths, segment ids
    rng = _rng(spec["name"])
    c_axis = layout.index("C")
    z = np.moveaxis(case.arrays["logits"], c_axis, -1)
    y = case.arrays["targets"]
    C = z.shape[-1]
    if kind in STATS_KINDS:
        z, y = _stats_logits(kind, z, y, rng, dtype)
    elif kind == "masked_vocab":  # targets off the masked columns (c % 3 == 1): log p(y) stays finite
        y = np.where((y >= 0) & (y % 3 == 1), y - 1, y)
    case.arrays["logits"] = np.moveaxis(z, -1, c_axis)
    case.arrays["targets"] = y
    tok_shape = y.shape
    N = spec["shape"].get("N", 1)

    options = dict(layout=layout, **opts)
    arrays = {k: case.arrays[k] for k in ("logits", "mask", "lengths", "segment_ids") if k in case.arrays}
    has_targets = spec.get("targets", "index") != "none"
    if has_targets:
        arrays["targets"] = y
    _add_stats_inputs(spec, arrays, tok_shape, C, N, rng, options, z, layout)
    counted, read = _counted_and_read(arrays, layout, options, tok_shape)
    if spec.get("garbage"):
        _write_garbage(case)  # the loss suite's rule, on the same counting (targets, shift, documents)
        arrays["logits"] = case.arrays["logits"]
        assert np.array_equal(~read, ~read_targets(case)) or not has_targets
        _garbage_side(arrays, ~read, C)
    if spec.get("bad"):
        _bad(spec, arrays, read, counted, C, layout)
    outputs = tuple(spec.get("outputs", _default_outputs(has_targets, "ids" in arrays)))
    options["outputs"] = outputs
    k = arrays["ids"].shape[-1] if "ids" in arrays else 0
    shapes = {o: tok_shape + (k,) if o == "ids_log_prob" else tok_shape for o in OUTPUTS}
    return StatsCase(name=f"{spec['name']}/{dtype}", base=spec["name"], dtype=dtype, layout=layout,
                     options=options, arrays=arrays, cotangents=_cotangents(spec, outputs, shapes, rng),
                     bad=spec.get("bad"), jit=bool(spec.get("jit")), spec=spec)


def _make_linear(spec: dict, dtype: str) -> StatsCase:
    """A fused-layer case: linear.make's hidden states, weight, bias, targets and side arrays."""
    base = {k: spec[k] for k in ("name", "layout", "shape", "bias", "weight_layout", "mask", "lengths", "ignore",
                                 "segments", "confident", "chunk") if k in spec}
    made = linear_cases.make(base, dtype)
    layout = spec["layout"]
    h_axis = layout.index("H")
    wl = spec.get("weight_layout", "CH")
    C = made["weight"].shape[0 if wl == "CH" else 1]
    y = made["targets"]
    tok_shape = y.shape
    N = tok_shape[layout.replace("H", "").index("N")] if "N" in layout else 1
    rng = _rng(spec["name"])
    opts = dict(spec.get("options", {}))
    options = dict(opts)
    arrays = {k: made[k] for k in ("hidden", "weight", "bias", "mask", "lengths", "segment_ids") if k in made}
    has_targets = spec.get("targets", "index") != "none"
    if has_targets:
        arrays["targets"] = y
    _add_stats_inputs(spec, arrays, tok_shape, C, N, rng, options, None, layout.replace("H", "C"))
    L = layout.replace("H", "C")
    counted, read = _counted_and_read(arrays, L, options, tok_shape)
    if spec.get("garbage"):  # NaN / inf hidden states at the tokens that do not count
        h = np.moveaxis(arrays["hidden"].copy(), h_axis, -1)
        junk = np.where(np.arange(h.shape[-1]) % 2, np.inf, np.nan)
        h[~counted] = junk
        arrays["hidden"] = np.moveaxis(h, -1, h_axis)
        _garbage_side(arrays, ~read, C)
    if spec.get("bad"):
        _bad(spec, arrays, read, counted, C, L)
    outputs = tuple(spec.get("outputs", _default_outputs(has_targets, "ids" in arrays)))
    options["outputs"] = outputs
    k = arrays["ids"].shape[-1] if "ids" in arrays else 0
    shapes = {o: tok_shape + (k,) if o == "ids_log_prob" else tok_shape for o in OUTPUTS}
    return StatsCase(name=f"{spec['name']}/{dtype}", base=spec["name"], dtype=dtype, layout=layout,
                     options=options, arrays=arrays, cotangents=_cotangents(spec, outputs, shapes, rng),
                     bad=spec.get("bad"), jit=bool(spec.get("jit")), linear=True, chunk_size=spec.get("chunk"),
                     weight_layout=wl, spec=spec)


def expand_stats(specs: list[dict] | None = None) -> list[StatsCase]:
    """Every base case crossed with its dtypes (STATS_CASES by default)."""
    out = []
    for spec in (STATS_CASES if specs is None else specs):
        for dtype in spec.get("dtypes", DTYPES):
            out.append(make_stats_inputs(spec, dtype))
    return out


def expand_linear_stats(specs: list[dict] | None = None) -> list[StatsCase]:
    return expand_stats(LINEAR_STATS_CASES if specs is None else specs)


_names = [c["name"] for c in STATS_CASES + LINEAR_STATS_CASES]
assert len(_names) == len(set(_names)), "duplicate stats case names"
