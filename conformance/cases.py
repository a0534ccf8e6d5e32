"""The declarative case matrix of the conformance suite.

A case is data: a layout, the sizes of its axes, how to fill the arrays and the
keyword options of ``sequence_cross_entropy``.  ``expand()`` crosses every base
case with its dtypes; ``make_inputs()`` turns one (case, dtype) into concrete
NumPy arrays, deterministically from the case name.  Low-precision logits are
rounded to their dtype *first*; the float64 reference is computed on the
rounded values, so only the kernel's own error is measured.

Keys of a base case (everything but ``name``, ``layout`` and ``shape`` is
optional):

``targets``   "index" (default) or "soft" (probabilities with logits' shape)
``inputs``    "logits" (default), "log_probs" or "probs"; also passed as option
``logits``    "normal" (default), "big" (+-1e4), "big_near_max" / "huge_near_max"
              (+-1e4 / +-3e4 with every target at or next to its row's maximum, so
              the loss is O(1) and any rounding at ulp(1e4) shows), "neginf" (-inf
              at non-target classes), "masked_vocab" (-inf in a few whole class
              columns, as vocabulary masking does: soft targets and "masked_vocab"
              class weights give those classes zero mass, 0 log 0 = 0), "uniform"
              (all equal)
``mask``      fraction of masked positions, or "all" (every position masked)
``lengths``   "random" or "with_zero" (the first sequence is empty)
``weights``   "random" (multiples of 0.25 in [0, 2]), "negative" (in [-1, 2]),
              "zeros" (all 0)
``class_weights``  "random" (in [0.25, 2]), "with_zero" (some classes 0) or
              "masked_vocab" (0 at the masked classes, which targets may hit)
``ignore``    fraction of positions whose target is an ``ignore_index`` value
``garbage``   True: NaN / +inf / -inf written into every position that does
              not count (padding holds garbage): in the logits' rows, and in the
              token weights and soft targets there too
``segments``  "random": segment_ids packing documents of random lengths into each
              sequence (ids repeat non-consecutively, a maximal run is one
              document), padding (-1) at the end of some rows
``ragged``    how the targets and the logits travel (API.md 7.1): "list" (targets,
              mask, weights and segment_ids as lists of per-sequence arrays,
              lengths implied), "native" (the framework's own ragged type: a
              PyTorch PackedSequence, a TensorFlow RaggedTensor; lists on NumPy
              and JAX), "nested" (PyTorch nested jagged tensors; lists elsewhere)
``target_dtype``  integer dtype of index targets (default "int64")
``options``   keyword options passed unchanged
``dtypes``    the dtypes to run (default all four)
``jit``       True: also run under jax.jit and tf.function(jit_compile=True)
``torch_compile``  True: also run under torch.compile (slow: a few cases only)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DTYPES = ("float64", "float32", "float16", "bfloat16")
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}

# The option sets that combine (mask x lengths x weights x class weights x ignore
# x smoothing) live on this shape unless a case says otherwise.
S = dict(N=2, T=4, C=6)
MIX = dict(mask=0.25, lengths="random", weights="random", class_weights="random", ignore=0.2)
# Where the logits' dtype matters little, fewer dtypes keep the full run short
# (JAX compiles every new shape and option set: about 0.4 s a case on 2 cores).
LABEL_DTYPES = ("float32", "bfloat16")       # label dtypes: labels must never pass through a float
EMPTY_DTYPES = ("float64", "float32", "float16")
# Shift, documents and ragged inputs move token-sized arrays (no arithmetic on the logits): two
# dtypes show the rules; a few cases keep a 16-bit dtype for the kernels that move rows.
VL_DTYPES = ("float64", "float32")
MIDDLE_DTYPES = ("float64", "float32", "bfloat16")


def _c(name, layout="NTC", shape=None, **kw):
    return dict(name=name, layout=layout, shape=dict(shape or S), **kw)


BASE_CASES: list[dict[str, Any]] = [
    # ---------------------------------------------------------------- layouts and shapes
    _c("ntc", "NTC", dict(N=2, T=3, C=5), jit=True, torch_compile=True),
    _c("nct", "NCT", dict(N=2, T=3, C=5), jit=True),
    _c("tnc", "TNC", dict(N=2, T=3, C=5)),
    _c("nc", "NC", dict(N=4, C=6)),
    _c("cn", "CN", dict(N=4, C=6)),
    _c("c", "C", dict(C=7)),
    _c("tc", "TC", dict(T=4, C=5), options=dict(reduction="per_position")),
    _c("cnt", "CNT", dict(N=2, T=3, C=5)),
    _c("ctn_none", "CTN", dict(N=2, T=3, C=4), options=dict(reduction="none")),
    _c("n1", "NTC", dict(N=1, T=4, C=5), options=dict(reduction="per_sequence")),
    _c("t1", "NTC", dict(N=3, T=1, C=4), options=dict(reduction="per_position")),
    _c("c1", "NTC", dict(N=2, T=3, C=1), options=dict(reduction="none")),
    _c("c1_others", "NC", dict(N=3, C=1), options=dict(label_smoothing=0.2, smoothing="others")),
    _c("c2", "NTC", dict(N=2, T=3, C=2), mask=0.3),
    _c("c2_nct_smooth", "NCT", dict(N=2, T=3, C=2), options=dict(label_smoothing=0.1)),
    _c("t_eq_c_nct", "NCT", dict(N=2, T=4, C=4), ignore=0.25, options=dict(num_classes=4)),
    _c("vocab32k", "NTC", dict(N=2, T=3, C=32000), jit=True),
    _c("vocab32k_nct_mix", "NCT", dict(N=2, T=3, C=32000), ignore=0.2, class_weights="random",
       options=dict(label_smoothing=0.1)),
    _c("vocab32k_zloss_cap", "NTC", dict(N=2, T=3, C=32000), mask=0.2,
       options=dict(z_loss=1e-4, logit_softcap=30.0)),
    _c("vocab32k_soft", "TNC", dict(N=2, T=3, C=32000), targets="soft", options=dict(label_smoothing=0.05)),
    # ---------------------------------------------------------------- which tokens count
    _c("mask", mask=0.3, jit=True),
    _c("mask_numeric", mask=0.3, options=dict(reduction="none")),  # numeric mask: nonzero counts
    _c("lengths", lengths="random", jit=True),
    _c("lengths_zero_per_sequence", lengths="with_zero", options=dict(reduction="per_sequence")),
    _c("ignore_default", ignore=0.3, jit=True, torch_compile=True),
    _c("ignore_in_range", ignore=0.3, options=dict(ignore_index=0)),
    _c("ignore_collection", ignore=0.4, options=dict(ignore_index=(-100, -1, 3))),
    _c("ignore_none", options=dict(ignore_index=None)),
    _c("mask_lengths_ignore", mask=0.2, lengths="random", ignore=0.2),
    # ---------------------------------------------------------------- weights
    _c("weights", weights="random"),
    _c("weights_tokens", weights="random", options=dict(denominator="tokens")),
    _c("weights_negative_tokens", weights="negative", mask=0.2, options=dict(denominator="tokens")),
    _c("class_weights", class_weights="random", jit=True),
    _c("class_weights_zero_ignore", class_weights="with_zero", ignore=0.2),
    _c("weights_class_weights_none", weights="random", class_weights="random", options=dict(reduction="none")),
    # ---------------------------------------------------------------- label smoothing
    _c("smooth_uniform", options=dict(label_smoothing=0.1)),
    _c("smooth_others", options=dict(label_smoothing=0.1, smoothing="others")),
    _c("smooth_one", options=dict(label_smoothing=1.0)),
    _c("smooth_others_one", options=dict(label_smoothing=1.0, smoothing="others")),
    _c("mix_uniform", **MIX, options=dict(label_smoothing=0.15), jit=True, torch_compile=True),
    _c("mix_others", **MIX, options=dict(label_smoothing=0.15, smoothing="others"), jit=True),
    _c("mix_others_tnc", "TNC", **MIX, options=dict(label_smoothing=0.2, smoothing="others",
                                                   ignore_index=(-100, 2))),
    # ---------------------------------------------------------------- z-loss and softcap
    _c("zloss", options=dict(z_loss=1e-2), jit=True),
    _c("zloss_mix", **MIX, options=dict(z_loss=1e-3, label_smoothing=0.1)),
    # z-loss is weighted like its token (cw[y]): one denominator serves the whole loss (issue 11)
    _c("zloss_class_weights", class_weights="random", options=dict(z_loss=5e-2), jit=True),
    _c("zloss_class_weights_soft", targets="soft", class_weights="random", options=dict(z_loss=5e-2),
       dtypes=VL_DTYPES),
    _c("softcap", logits="big", options=dict(logit_softcap=5.0), jit=True),
    _c("softcap_zloss_mix", **MIX, options=dict(logit_softcap=3.0, z_loss=1e-2, label_smoothing=0.1)),
    # ---------------------------------------------------------------- soft targets
    _c("soft", targets="soft", jit=True),
    _c("soft_smooth_cw", targets="soft", class_weights="random", options=dict(label_smoothing=0.1)),
    _c("soft_others_mix", targets="soft", mask=0.25, lengths="random", weights="random",
       class_weights="random", options=dict(label_smoothing=0.1, smoothing="others")),
    _c("soft_nct_none", "NCT", targets="soft", mask=0.3, options=dict(reduction="none")),
    _c("soft_ignore_unused", targets="soft", options=dict(ignore_index=0)),  # decisions.md 4
    _c("soft_garbage", targets="soft", mask=0.4, garbage=True),
    # ---------------------------------------------------------------- log_probs and probs inputs
    _c("log_probs", inputs="log_probs", jit=True),
    _c("log_probs_mix", inputs="log_probs", **MIX, options=dict(label_smoothing=0.1)),
    _c("log_probs_garbage", inputs="log_probs", mask=0.4, garbage=True),
    _c("probs", inputs="probs", jit=True),
    _c("probs_mix", inputs="probs", **MIX, options=dict(label_smoothing=0.1, smoothing="others")),
    _c("probs_soft", inputs="probs", targets="soft", mask=0.25),
    # ---------------------------------------------------------------- reductions x denominators
    _c("red_none", **MIX, options=dict(reduction="none")),
    _c("red_sum", **MIX, options=dict(reduction="sum")),
    *[_c(f"red_{r}_{d}", **MIX, options=dict(reduction=r, denominator=d), jit=(d == "weights"),
         dtypes=("float64", "float32", "bfloat16"))
      for r in ("mean", "per_sequence", "per_position", "sequence_mean")
      for d in ("weights", "tokens", "positions")],
    _c("red_per_sequence_tnc", "TNC", mask=0.3, lengths="random", options=dict(reduction="per_sequence")),
    _c("red_per_position_nct", "NCT", mask=0.3, ignore=0.2, options=dict(reduction="per_position")),
    _c("red_sequence_mean_cnt", "CNT", lengths="random", weights="random",
       options=dict(reduction="sequence_mean", denominator="tokens")),
    _c("red_per_sequence_nc", "NC", dict(N=5, C=4), ignore=0.4, options=dict(reduction="per_sequence")),
    # ---------------------------------------------------------------- normalizer and empty
    _c("normalizer_mean", **MIX, options=dict(normalizer=10.0), jit=True),
    _c("normalizer_sequence_mean", **MIX, options=dict(reduction="sequence_mean", normalizer=3)),
    _c("normalizer_zero_zero", mask=0.3, options=dict(normalizer=0.0), dtypes=EMPTY_DTYPES),
    _c("normalizer_zero_nan", mask=0.3, options=dict(normalizer=0.0, empty="nan"), dtypes=EMPTY_DTYPES),
    _c("all_masked_mean_zero", mask="all", jit=True),
    _c("all_masked_mean_nan", mask="all", options=dict(empty="nan")),
    _c("all_masked_sum", mask="all", options=dict(reduction="sum"), dtypes=EMPTY_DTYPES),
    _c("all_masked_per_position_nan", mask="all", options=dict(reduction="per_position", empty="nan"),
       dtypes=EMPTY_DTYPES),
    _c("empty_sequence_nan", lengths="with_zero", options=dict(reduction="per_sequence", empty="nan")),
    _c("empty_sequence_mean_nan", lengths="with_zero",
       options=dict(reduction="sequence_mean", empty="nan")),
    _c("zero_weight_sum_nan", weights="zeros", options=dict(empty="nan")),
    _c("zero_weight_sum_zero", weights="zeros", dtypes=EMPTY_DTYPES),
    # ---------------------------------------------------------------- edge values
    _c("big_logits", logits="big", jit=True),
    _c("big_logits_mix", logits="big", **MIX, options=dict(label_smoothing=0.1, z_loss=1e-4)),
    _c("big_near_max", logits="big_near_max", jit=True),
    _c("big_near_max_ignore", logits="big_near_max", ignore=0.2, options=dict(reduction="none"),
       dtypes=("float32", "bfloat16")),
    _c("huge_near_max", logits="huge_near_max", options=dict(reduction="none"), dtypes=("float32", "float16")),
    _c("huge_near_max_mix", "NCT", logits="huge_near_max", mask=0.2, class_weights="random",
       options=dict(label_smoothing=0.05, reduction="sum")),
    _c("neginf_nontarget", logits="neginf", class_weights="random", mask=0.2),
    # 0 log 0 = 0 at -inf logits (issue 17): zero target mass there adds exactly 0, loss and gradient;
    # with smoothing every class has mass and the loss is +inf (API.md 1)
    _c("masked_vocab_soft", targets="soft", logits="masked_vocab", mask=0.2, jit=True, dtypes=MIDDLE_DTYPES),
    _c("masked_vocab_soft_cw", "NCT", targets="soft", logits="masked_vocab", class_weights="random",
       options=dict(reduction="none"), dtypes=VL_DTYPES),
    _c("masked_vocab_cw", logits="masked_vocab", class_weights="masked_vocab", ignore=0.2, dtypes=VL_DTYPES),
    _c("masked_vocab_cw_sum", "TNC", logits="masked_vocab", class_weights="masked_vocab", weights="random",
       options=dict(reduction="sum", z_loss=1e-3)),
    _c("masked_vocab_smoothing_inf", logits="masked_vocab", options=dict(label_smoothing=0.1, reduction="none"), dtypes=VL_DTYPES),
    _c("uniform_logits", logits="uniform", options=dict(reduction="none")),
    _c("garbage_masked", mask=0.4, garbage=True, jit=True, torch_compile=True),
    _c("garbage_mix", **MIX, garbage=True, options=dict(label_smoothing=0.1, z_loss=1e-3)),
    _c("garbage_lengths_softcap", lengths="with_zero", garbage=True,
       options=dict(logit_softcap=4.0, reduction="per_sequence")),
    # the default call with garbage at ignored rows: a backend's default-call kernel (issue 11)
    _c("garbage_ignored", ignore=0.3, garbage=True, jit=True),
    _c("garbage_weights_tokens", weights="random", mask=0.3, lengths="random", garbage=True,
       options=dict(denominator="tokens", reduction="per_sequence")),
    _c("all_ignored_mean_nan", ignore=1.0, options=dict(empty="nan"), dtypes=EMPTY_DTYPES),
    _c("all_ignored_mean_zero", ignore=1.0, dtypes=EMPTY_DTYPES),
    # larger than one chunk of the default sizes (2**21 elements): chunk boundaries as shipped
    _c("multichunk_default", "NTC", dict(N=1, T=80, C=32768), ignore=0.1, dtypes=("float32", "bfloat16")),
    # ---------------------------------------------------------------- variable length (API.md 7)
    _c("shift1", options=dict(shift=1), jit=True, torch_compile=True, dtypes=MIDDLE_DTYPES),
    _c("shift2_mix", **MIX, options=dict(shift=2, label_smoothing=0.1, z_loss=1e-3), dtypes=VL_DTYPES),
    _c("shift_lengths_per_sequence", lengths="random", ignore=0.2, options=dict(shift=1, reduction="per_sequence"), dtypes=VL_DTYPES),
    _c("shift_per_position_nan", mask=0.2, options=dict(shift=1, reduction="per_position", empty="nan"), dtypes=VL_DTYPES),
    _c("shift_positions", mask=0.2, lengths="random", options=dict(shift=1, denominator="positions"), jit=True, dtypes=VL_DTYPES),
    _c("shift_tnc_soft", "TNC", targets="soft", mask=0.2, options=dict(shift=1, label_smoothing=0.1), dtypes=VL_DTYPES),
    _c("shift_normalizer", ignore=0.2, weights="random", options=dict(shift=1, normalizer=5.0), dtypes=VL_DTYPES),
    _c("shift_past_T", "NTC", dict(N=2, T=2, C=5), options=dict(shift=3, empty="nan"), dtypes=VL_DTYPES),
    _c("shift_garbage", mask=0.3, weights="random", garbage=True, options=dict(shift=1, reduction="sum"), dtypes=VL_DTYPES),
    _c("segments_mean", "NTC", dict(N=2, T=9, C=5), segments="random", ignore=0.1, dtypes=VL_DTYPES),
    _c("segments_per_segment", "NTC", dict(N=3, T=9, C=5), segments="random", options=dict(reduction="per_segment"),
       jit=True, dtypes=VL_DTYPES),
    _c("segments_segment_mean_shift", "NTC", dict(N=3, T=9, C=5), segments="random", weights="random",
       options=dict(reduction="segment_mean", shift=1), jit=True, torch_compile=True, dtypes=MIDDLE_DTYPES),
    _c("segments_positions_shift_nan", "NTC", dict(N=2, T=9, C=5), segments="random", mask=0.2,
       options=dict(reduction="per_segment", shift=1, denominator="positions", empty="nan"), dtypes=VL_DTYPES),
    _c("segments_tnc", "TNC", dict(N=2, T=9, C=4), segments="random", class_weights="random",
       options=dict(reduction="per_segment", shift=1, label_smoothing=0.1), dtypes=VL_DTYPES),
    _c("segments_normalizer", "NTC", dict(N=2, T=9, C=5), segments="random",
       options=dict(reduction="segment_mean", normalizer=7.0), dtypes=VL_DTYPES),
    _c("segments_soft_shift", "NTC", dict(N=2, T=9, C=5), targets="soft", segments="random",
       options=dict(shift=1, reduction="segment_mean"), dtypes=VL_DTYPES),
    _c("segments_lengths_none", "NTC", dict(N=2, T=9, C=5), segments="random", lengths="random",
       options=dict(shift=2, reduction="none"), dtypes=VL_DTYPES),
    _c("ragged_list", lengths="random", ragged="list", ignore=0.2, mask=0.2, weights="random", dtypes=VL_DTYPES),
    _c("ragged_list_shift_none", lengths="random", ragged="list", options=dict(shift=1, reduction="none"), dtypes=VL_DTYPES),
    _c("ragged_native", "NTC", dict(N=3, T=5, C=6), lengths="random", ragged="native", ignore=0.2,
       options=dict(reduction="per_sequence"), dtypes=VL_DTYPES),
    _c("ragged_native_none", lengths="random", ragged="native", mask=0.2, weights="random",
       options=dict(reduction="none", label_smoothing=0.1), dtypes=MIDDLE_DTYPES),
    _c("ragged_native_soft", lengths="random", ragged="native", targets="soft", options=dict(z_loss=1e-2), dtypes=VL_DTYPES),
    _c("ragged_native_segments", "NTC", dict(N=2, T=9, C=5), lengths="random", ragged="native", segments="random",
       options=dict(reduction="segment_mean", shift=1), dtypes=VL_DTYPES),
    _c("ragged_native_per_position", lengths="random", ragged="native", class_weights="random",
       options=dict(reduction="per_position", shift=1), dtypes=VL_DTYPES),
    _c("ragged_nested", "NTC", dict(N=3, T=5, C=6), lengths="random", ragged="nested", ignore=0.2,
       options=dict(reduction="per_sequence", shift=1), dtypes=VL_DTYPES),
    _c("ragged_nested_none_soft", lengths="random", ragged="nested", targets="soft", options=dict(reduction="none"), dtypes=VL_DTYPES),
    # ---------------------------------------------------------------- label dtypes (decisions.md 14)
    _c("targets_int32", target_dtype="int32", ignore=0.2, dtypes=LABEL_DTYPES),
    _c("targets_uint8", target_dtype="uint8", options=dict(ignore_index=None), dtypes=LABEL_DTYPES),
    _c("targets_int8", target_dtype="int8", ignore=0.2, dtypes=LABEL_DTYPES),
    _c("targets_int16_ignore_collection", target_dtype="int16", ignore=0.3,
       options=dict(ignore_index=(-100, -1)), dtypes=LABEL_DTYPES),
]


@dataclass
class Case:
    """One base case at one dtype, with its concrete arrays (NumPy, float64 for floats)."""
    name: str                      # "<base>/<dtype>"
    base: str
    dtype: str
    layout: str
    options: dict                  # keyword options, arrays excluded
    arrays: dict                   # logits, targets and the side arrays that are set
    target_dtype: str = "int64"
    jit: bool = False
    torch_compile: bool = False
    spec: dict = field(default_factory=dict)

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]

    @property
    def soft(self) -> bool:
        return self.arrays["targets"].dtype.kind == "f"

    def kwargs(self) -> dict:
        """The full keyword options (side arrays as NumPy) for the reference, layout excluded."""
        kw = {k: v for k, v in self.options.items() if k != "layout"}
        for k in SIDE_ARRAYS:
            if k in self.arrays:
                kw[k] = self.arrays[k]
        return kw

    @property
    def ragged(self) -> str | None:
        return self.spec.get("ragged")


SIDE_ARRAYS = ("mask", "lengths", "weights", "class_weights", "segment_ids")


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to ``dtype`` (round to nearest even) and return them as float64."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float64":
        return x.copy()
    if dtype in ("float32", "float16"):
        return x.astype(dtype).astype(np.float64)
    # bfloat16: the upper 16 bits of the float32 pattern, rounded to nearest even
    # (written out so that ml_dtypes is not needed just to round).
    f = x.astype(np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    out = bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return np.where(np.isnan(x), np.nan, out)


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def make_case(spec: dict, dtype: str) -> Case:
    """Concrete arrays for one base case at one dtype (deterministic in the case name)."""
    rng = np.random.default_rng(_seed(spec["name"]))  # the same data for every dtype
    layout = spec["layout"]
    sizes = spec["shape"]
    k = layout.index("C")
    C = sizes["C"]
    tok_layout = layout.replace("C", "")
    tok_shape = tuple(sizes[a] for a in tok_layout)
    options = dict(layout=layout, **spec.get("options", {}))
    inputs = spec.get("inputs", "logits")
    if inputs != "logits":
        options["inputs"] = inputs
    arrays: dict[str, np.ndarray] = {}

    # targets
    y = rng.integers(0, C, size=tok_shape)
    ignore = options.get("ignore_index", -100)
    ignore_values = [] if ignore is None else ([ignore] if isinstance(ignore, int) else list(ignore))
    if spec.get("ignore") and ignore_values:
        hit = rng.uniform(size=tok_shape) < spec["ignore"]
        if not hit.any():
            hit.flat[0] = True
        y = np.where(hit, np.array(ignore_values)[rng.integers(0, len(ignore_values), tok_shape)], y)

    # logits (or log-probabilities, probabilities), class axis moved last while building
    last = (*tok_shape, C)
    kind = spec.get("logits", "normal")
    if inputs == "probs":
        # exact multiples of 1/64 summing to 1 (representable in every dtype), zeros included
        counts = np.stack([rng.multinomial(64, _softmax(rng.normal(0, 1.5, C), 0))
                           for _ in range(int(np.prod(tok_shape)))]).reshape(last)
        z = counts / 64.0
    else:
        z = rng.normal(0.0, 2.0, size=last)
        if kind in ("big", "big_near_max", "huge_near_max"):
            z = z + (3e4 if kind == "huge_near_max" else 1e4) * rng.choice([-1.0, 1.0], size=last)
        elif kind == "uniform":
            z = np.full(last, 0.5)
        if inputs == "log_probs":
            m = z.max(-1, keepdims=True)
            z = z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))
    z = round_to(z, dtype)
    if kind.endswith("_near_max"):
        # the target is the row's maximum or its runner-up (ties broken by position): a loss near
        # log(1 + e^-d), where lse and z[y] rounded separately at ulp(1e4) would show (issue 11)
        top2 = np.argsort(-z, axis=-1, kind="stable")[..., :2]
        pick = np.take_along_axis(top2, rng.integers(0, 2, size=(*tok_shape, 1)), -1)[..., 0]
        y = np.where(y < 0, y, pick)
    if kind == "neginf":
        idx = np.where(np.broadcast_to(y[..., None], last) < 0, 0, np.broadcast_to(y[..., None], last))
        off = (np.arange(C) != idx) & (rng.uniform(size=last) < 0.4)
        z = np.where(off, -np.inf, z)
    masked = np.arange(C) % 3 == 1 if kind == "masked_vocab" else None  # the masked class columns
    if masked is not None:
        z = np.where(masked, -np.inf, z)
    soft = spec.get("targets", "index") == "soft"
    if soft:
        q = _softmax(rng.normal(0.0, 1.5, size=last), -1) if C > 1 else np.ones(last)
        if masked is not None:  # zero mass at the masked classes, exactly
            q = np.where(masked, 0.0, q)
            q = q / q.sum(-1, keepdims=True)
        q = round_to(q, dtype)

    # which positions count
    if spec.get("mask") is not None:
        if spec["mask"] == "all":
            mask = np.zeros(tok_shape, dtype=bool)
        else:
            mask = rng.uniform(size=tok_shape) >= spec["mask"]
            if not mask.any():
                mask.flat[0] = True
        if spec["name"] == "mask_numeric":
            arrays["mask"] = mask * rng.integers(1, 4, size=tok_shape).astype(np.float32)
        else:
            arrays["mask"] = mask
    if spec.get("lengths"):
        N, T = sizes["N"], sizes["T"]
        lengths = rng.integers(1, T + 1, size=N)
        if spec["lengths"] == "with_zero":
            lengths[0] = 0
        if spec.get("ragged"):  # a ragged batch pads to its longest sequence: one is full length
            lengths[-1] = T
        arrays["lengths"] = lengths.astype(np.int64)
    if spec.get("segments"):
        seg = _segments(rng, sizes, tok_layout)
        if "lengths" in arrays:  # past a sequence's end the ids are padding (a ragged batch has none)
            steps = np.arange(sizes["T"])
            past = steps[None, :] >= arrays["lengths"][:, None]
            seg = np.where(past if tok_layout == "NT" else past.T, -1, seg)
        arrays["segment_ids"] = seg
    if spec.get("weights"):
        if spec["weights"] == "zeros":
            w = np.zeros(tok_shape)
        elif spec["weights"] == "negative":
            w = rng.integers(-4, 9, size=tok_shape) / 4.0
        else:
            w = rng.integers(0, 9, size=tok_shape) / 4.0
        arrays["weights"] = w
    if spec.get("class_weights"):
        cw = rng.integers(1, 9, size=C) / 4.0
        if spec["class_weights"] == "masked_vocab":
            cw[np.arange(C) % 3 == 1] = 0.0
        if spec["class_weights"] == "with_zero":
            cw[rng.uniform(size=C) < 0.3] = 0.0
            cw[0] = 0.0
        arrays["class_weights"] = cw

    # move the class axis to where the layout puts it
    z = np.moveaxis(z, -1, k)
    arrays["logits"] = z
    if soft:
        arrays["targets"] = np.moveaxis(q, -1, k)
    else:
        arrays["targets"] = y.astype(spec.get("target_dtype", "int64"))

    case = Case(name=f"{spec['name']}/{dtype}", base=spec["name"], dtype=dtype, layout=layout,
                options=options, arrays=arrays, target_dtype=spec.get("target_dtype", "int64"),
                jit=bool(spec.get("jit")), torch_compile=bool(spec.get("torch_compile")), spec=spec)
    if spec.get("garbage"):
        _write_garbage(case)
    return case


def _segments(rng: np.random.Generator, sizes: dict, tok_layout: str) -> np.ndarray:
    """Documents of random lengths (1 to 4 steps) packed into each sequence, ids drawn from a small
    set so that an id repeats non-consecutively (each maximal run is its own document), and -1
    padding after the last document in some rows."""
    N, T = sizes.get("N", 1), sizes["T"]
    seg = np.full((N, T), -1, np.int64)
    for n in range(N):
        t = 0
        end = T if n % 2 == 0 else T - int(rng.integers(1, 3))
        prev = None
        while t < end:
            d = int(rng.integers(1, 5))
            v = int(rng.integers(0, 3))
            while v == prev:
                v = int(rng.integers(0, 3))
            seg[n, t:min(t + d, end)] = v
            prev, t = v, t + d
    if tok_layout == "TN":
        seg = seg.T
    return seg if "N" in tok_layout else seg[0]


def counted(case: Case) -> np.ndarray:
    """Which positions count (token shape), computed with the reference's rule."""
    from .reference import counted_positions
    kw = case.kwargs()
    return counted_positions(case.arrays["targets"], layout=case.layout, mask=kw.get("mask"),
                             lengths=kw.get("lengths"), ignore_index=case.options.get("ignore_index", -100),
                             soft=case.soft, shift=kw.get("shift", 0), segment_ids=kw.get("segment_ids"))


def read_targets(case: Case) -> np.ndarray:
    """The target positions some counted step reads (t + shift): the rest of the target-side
    arrays is never used, and there garbage goes."""
    from .reference import counted_positions
    kw = case.kwargs()
    return counted_positions(case.arrays["targets"], layout=case.layout, mask=kw.get("mask"),
                             lengths=kw.get("lengths"), ignore_index=case.options.get("ignore_index", -100),
                             soft=case.soft, shift=kw.get("shift", 0), segment_ids=kw.get("segment_ids"),
                             at_targets=True)


def _write_garbage(case: Case) -> None:
    """NaN, +inf and -inf in the rows of every position that does not count: in the logits, and
    in the token weights and the soft targets there (a side array's padding holds garbage too)."""
    k = case.layout.index("C")
    off, unread = ~counted(case), ~read_targets(case)
    pattern = np.array([np.nan, np.inf, -np.inf])
    for name, where in (("logits", off), ("targets", unread)) if case.soft else (("logits", off),):
        z = np.moveaxis(case.arrays[name].copy(), k, -1)
        z[where] = np.resize(pattern, z.shape[-1])
        case.arrays[name] = np.moveaxis(z, -1, k)
    if "weights" in case.arrays:
        w = case.arrays["weights"].copy()
        w[unread] = np.resize(pattern, int(unread.sum()))
        case.arrays["weights"] = w


def expand(specs: list[dict] | None = None) -> list[Case]:
    """Every base case crossed with its dtypes."""
    out = []
    for spec in (BASE_CASES if specs is None else specs):
        for dtype in spec.get("dtypes", DTYPES):
            out.append(make_case(spec, dtype))
    return out


def base_names() -> list[str]:
    return [c["name"] for c in BASE_CASES]


_names = base_names()
assert len(_names) == len(set(_names)), "duplicate case names"
