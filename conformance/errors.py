"""The bad-input contract (API.md section 2, docs/decisions.md items 3, 5, 6, 9, 11).

``CATALOGUE`` is data: each entry edits a small valid base input (logits of
shape (N=2, T=3, C=5), layout "NTC") and says what must happen.

* In eager mode with validation on, the call raises ``expect`` (the class name
  in xseqloss) and the message contains every string of ``match`` (the
  argument's name; for a single bad element its position ``name[i, j]``, the
  value ``= v`` and the valid range).
* Entries with ``nan`` are value problems: with ``validate=False`` and under
  tracing (jax.jit, tf.function(jit_compile=True), torch.compile) the listed
  tokens give NaN loss (reduction="none") and NaN gradient rows, every other
  token equals the reference (computed with ``fix`` applied and the NaN tokens
  masked out), and reduction="mean" is NaN.
* Entries with ``jit`` are static problems that must also raise at trace time.

Edits (``arrays``): a list sets that array to the list's value; a dict may
give ``dtype`` (cast), ``shape`` (a fresh array of that shape) or ``set``
(a list of (index, value) element edits).
"""

from __future__ import annotations

from typing import Any

import numpy as np

E, TE = "XSeqLossError", "XSeqLossTypeError"
SHAPE = dict(N=2, T=3, C=5)

CATALOGUE: list[dict[str, Any]] = [
    # ------------------------------------------------------------------ labels
    dict(name="target_ge_C", arrays=dict(targets=dict(set=[((0, 1), 5)])), expect=E,
         match=["targets[0, 1]", "= 5", "[0, 5)"], nan=[(0, 1)], fix=dict(targets=dict(set=[((0, 1), 0)])),
         torch_compile=True),
    dict(name="target_negative", arrays=dict(targets=dict(set=[((1, 2), -1)])), expect=E,
         match=["targets[1, 2]", "= -1"], nan=[(1, 2)], fix=dict(targets=dict(set=[((1, 2), 0)]))),
    dict(name="target_minus100_not_ignored", options=dict(ignore_index=None),
         arrays=dict(targets=dict(set=[((0, 0), -100)])), expect=E, match=["targets[0, 0]", "= -100"],
         nan=[(0, 0)], fix=dict(targets=dict(set=[((0, 0), 1)]))),
    dict(name="target_ge_C_ignore_collection", options=dict(ignore_index=(-100, 7)),
         arrays=dict(targets=dict(set=[((1, 0), 6), ((1, 1), 7)])), expect=E, match=["targets[1, 0]", "= 6"],
         nan=[(1, 0)], fix=dict(targets=dict(set=[((1, 0), 2)]))),
    dict(name="target_int64_huge", numpy_side=True, arrays=dict(targets=dict(set=[((0, 2), 2 ** 40)])),
         expect=E, match=["targets[0, 2]"]),
    dict(name="targets_float", arrays=dict(targets=dict(dtype="float32")), expect=TE, match=["targets"],
         jit=True),
    dict(name="targets_bool", arrays=dict(targets=dict(dtype="bool")), expect=TE, match=["targets"]),
    dict(name="targets_trailing_1", arrays=dict(targets=dict(shape=[2, 3, 1])), expect=E, match=["targets"]),
    dict(name="targets_broadcast", arrays=dict(targets=dict(shape=[1, 3])), expect=E,
         match=["targets", "(1, 3)", "N=2, T=3"]),
    dict(name="targets_swapped_layout", arrays=dict(logits=dict(shape=[2, 5, 3])), expect=E,
         match=["targets", 'did you mean layout="NCT"?']),
    # ------------------------------------------------------------------ logits
    dict(name="logits_integer", arrays=dict(logits=dict(dtype="int64")), expect=TE, match=["logits"]),
    dict(name="logits_C0", arrays=dict(logits=dict(shape=[2, 3, 0])), expect=E, match=["logits"]),
    dict(name="logits_rank", arrays=dict(logits=dict(shape=[2, 3])), expect=E, match=["layout"]),
    dict(name="num_classes", options=dict(num_classes=4), expect=E, match=["num_classes"]),
    dict(name="probs_above_one", options=dict(inputs="probs"), base="probs",
         arrays=dict(logits=dict(set=[((0, 1, 0), 1.5)])), expect=E, match=["logits[0, 1", 'inputs="logits"'],
         nan=[(0, 1)], fix=dict(logits=dict(set=[((0, 1, 0), 0.0)]))),
    dict(name="probs_row_sum", options=dict(inputs="probs"), base="probs",
         arrays=dict(logits=dict(set=[((1, 1, 2), 0.0)])), expect=E, match=["logits", 'inputs="logits"'],
         nan=[(1, 1)], fix=dict(logits=dict(set=[((1, 1, 2), 0.125)]))),
    dict(name="soft_target_negative", base="soft", arrays=dict(targets=dict(set=[((1, 0, 3), -0.25)])),
         expect=E, match=["targets"], nan=[(1, 0)], fix=dict(targets=dict(set=[((1, 0, 3), 0.25)]))),
    # ------------------------------------------------------------------ lengths
    dict(name="lengths_negative", arrays=dict(lengths=[-1, 3]), expect=E, match=["lengths[0]", "= -1", "[0, 3]"],
         nan=[(0, 0), (0, 1), (0, 2)], fix=dict(lengths=[0, 3])),
    dict(name="lengths_gt_T", arrays=dict(lengths=[2, 4]), expect=E, match=["lengths[1]", "= 4", "[0, 3]"],
         nan=[(1, 0), (1, 1), (1, 2)], fix=dict(lengths=[2, 0]), torch_compile=True),
    dict(name="lengths_float", arrays=dict(lengths=dict(dtype="float32", set=[((0,), 2.0), ((1,), 3.0)])),
         expect=TE, match=["lengths"]),
    dict(name="lengths_shape", arrays=dict(lengths=[1, 2, 3]), expect=E, match=["lengths", "(3,)", "N=2"]),
    dict(name="lengths_without_T", layout="NC", arrays=dict(logits=dict(shape=[2, 5]), targets=[1, 2],
                                                           lengths=[1, 1]), expect=E, match=["lengths"]),
    # ------------------------------------------------------------------ mask / weights / class weights
    dict(name="mask_shape", arrays=dict(mask=dict(shape=[2, 4])), expect=E,
         match=["mask has shape (2, 4) but must be (N=2, T=3)"], jit=True),
    dict(name="weights_shape", arrays=dict(weights=dict(shape=[3, 2])), expect=E,
         match=["weights", "(3, 2)", "(N=2, T=3)"]),
    dict(name="class_weights_shape", arrays=dict(class_weights=[1.0, 1.0, 1.0, 1.0]), expect=E,
         match=["class_weights", "(4,)"]),
    dict(name="class_weights_negative", arrays=dict(class_weights=[1.0, -1.0, 1.0, 1.0, 1.0],
                                                    targets=dict(set=[((0, 2), 1)])),
         expect=E, match=["class_weights[1]", "= -1"], nan="class:1",
         fix=dict(class_weights=[1.0, 1.0, 1.0, 1.0, 1.0])),
    dict(name="class_weights_inf_smoothing", options=dict(label_smoothing=0.1),
         arrays=dict(class_weights=[1.0, 1.0, np.inf, 1.0, 1.0]), expect=E, match=["class_weights[2]", "inf"],
         nan="all", fix=dict(class_weights=[1.0, 1.0, 1.0, 1.0, 1.0])),
    # ------------------------------------------------------------------ options
    dict(name="label_smoothing_negative", options=dict(label_smoothing=-0.1), expect=E,
         match=["label_smoothing", "[0, 1]"]),
    dict(name="label_smoothing_above_one", options=dict(label_smoothing=1.5), expect=E,
         match=["label_smoothing", "[0, 1]"]),
    dict(name="z_loss_negative", options=dict(z_loss=-1e-3), expect=E, match=["z_loss"]),
    dict(name="logit_softcap_zero", options=dict(logit_softcap=0.0), expect=E, match=["logit_softcap"]),
    dict(name="z_loss_with_log_probs", options=dict(z_loss=1e-3, inputs="log_probs"), expect=E,
         match=["z_loss"]),
    dict(name="softcap_with_probs", options=dict(logit_softcap=5.0, inputs="probs"), base="probs", expect=E,
         match=["logit_softcap"]),
    dict(name="unknown_layout", options=dict(layout="NTX"), expect=E, match=["layout"]),
    dict(name="repeated_layout_letter", options=dict(layout="NNC"), expect=E, match=["layout"]),
    dict(name="unknown_reduction", options=dict(reduction="avg"), expect=E, match=["reduction"], jit=True),
    dict(name="unknown_denominator", options=dict(denominator="count"), expect=E, match=["denominator"]),
    dict(name="unknown_inputs", options=dict(inputs="softmax"), expect=E, match=["inputs"]),
    dict(name="unknown_smoothing", options=dict(smoothing="label"), expect=E, match=["smoothing"]),
    dict(name="unknown_empty", options=dict(empty="inf"), expect=E, match=["empty"]),
    dict(name="unknown_backend", options=dict(backend="mxnet"), expect=E, match=["backend"]),
    dict(name="normalizer_with_sum", options=dict(reduction="sum", normalizer=4.0), expect=E,
         match=["normalizer"]),
    dict(name="normalizer_negative", options=dict(normalizer=-1.0), expect=E, match=["normalizer"]),
    dict(name="per_position_without_T", layout="NC", options=dict(reduction="per_position"),
         arrays=dict(logits=dict(shape=[2, 5]), targets=[1, 2]), expect=E, match=["per_position"]),
    dict(name="per_sequence_without_N", layout="TC", options=dict(reduction="per_sequence"),
         arrays=dict(logits=dict(shape=[3, 5]), targets=[1, 2, 3]), expect=E, match=["per_sequence"]),
    dict(name="inplace_backward_not_torch", options=dict(inplace_backward=True), expect=E,
         match=["inplace_backward"], skip=("torch",)),
    dict(name="mask_of_other_framework", other_framework="mask", expect=TE, match=["mask"]),
    # ------------------------------------------------------------------ variable length (API.md 7)
    dict(name="shift_negative", options=dict(shift=-1), expect=E, match=["shift=-1", "[0, inf)"], jit=True),
    dict(name="shift_float", options=dict(shift=1.0), expect=TE, match=["shift", "integer"], jit=True),
    dict(name="shift_without_T", layout="NC", options=dict(shift=1),
         arrays=dict(logits=dict(shape=[2, 5]), targets=[1, 2]), expect=E, match=["shift=1", "time axis (T)"]),
    dict(name="segment_ids_shape", arrays=dict(segment_ids=[[0, 0, 1]]), expect=E,
         match=["segment_ids has shape (1, 3) but must be (N=2, T=3)"], jit=True),
    dict(name="segment_ids_float", arrays=dict(segment_ids=dict(dtype="float32", set=[((0, 0), 0.0)])),
         expect=TE, match=["segment_ids", "integer"], jit=True),
    dict(name="per_segment_without_segment_ids", options=dict(reduction="per_segment"), expect=E,
         match=["per_segment", "segment_ids"], jit=True),
    dict(name="segment_mean_without_segment_ids", options=dict(reduction="segment_mean"), expect=E,
         match=["segment_mean", "segment_ids"]),
    dict(name="segment_ids_without_T", layout="NC", arrays=dict(logits=dict(shape=[2, 5]), targets=[1, 2],
                                                               segment_ids=[0, 1]),
         expect=E, match=["segment_ids", "time axis (T)"]),
    dict(name="shifted_target_ge_C", options=dict(shift=1), arrays=dict(targets=dict(set=[((0, 2), 5)])),
         expect=E, match=["targets[0, 2]", "= 5", "[0, 5)"], nan=[(0, 1)], fix=dict(targets=dict(set=[((0, 2), 0)]))),
]


# The entries that apply to linear_cross_entropy as they are (the "logits" become its hidden states
# with an identity weight): every entry not about the logits' own values, dtype, rank or inputs=.
LINEAR = ("target_ge_C", "target_negative", "target_minus100_not_ignored", "target_ge_C_ignore_collection",
          "target_int64_huge", "targets_float", "targets_bool", "targets_trailing_1", "targets_broadcast",
          "lengths_negative", "lengths_gt_T", "lengths_float", "lengths_shape", "mask_shape", "weights_shape",
          "class_weights_shape", "class_weights_negative", "class_weights_inf_smoothing",
          "label_smoothing_negative", "label_smoothing_above_one", "z_loss_negative", "logit_softcap_zero",
          "unknown_reduction", "unknown_denominator", "unknown_smoothing", "unknown_empty", "unknown_backend",
          "normalizer_with_sum", "normalizer_negative", "shift_negative", "shift_float", "segment_ids_shape",
          "segment_ids_float", "per_segment_without_segment_ids", "shifted_target_ge_C", "mask_of_other_framework")


def _edit(a: np.ndarray, spec: Any, rng: np.random.Generator) -> np.ndarray:
    if isinstance(spec, list):
        return np.asarray(spec)
    if "shape" in spec:
        shape = tuple(spec["shape"])
        a = (rng.normal(size=shape) if a.dtype.kind == "f" else rng.integers(0, max(1, shape[-1] if shape else 1),
                                                                          size=shape)).astype(a.dtype)
        if a.dtype.kind == "b":
            a = np.ones(shape, bool)
    if "dtype" in spec:
        a = a.astype(spec["dtype"])
    a = a.copy()
    for idx, v in spec.get("set", []):
        if isinstance(v, int) and a.dtype.kind in "iu" and not np.can_cast(np.min_scalar_type(v), a.dtype):
            a = a.astype(np.int64)
        a[idx] = v
    return a


def base_inputs(entry: dict) -> tuple[dict, dict]:
    """The valid base arrays and options of an entry, before its edits."""
    rng = np.random.default_rng(1234)
    N, T, C = SHAPE["N"], SHAPE["T"], SHAPE["C"]
    arrays = dict(logits=rng.normal(0, 2, size=(N, T, C)).astype(np.float32),
                  targets=rng.integers(1, C, size=(N, T)).astype(np.int64))
    kind = entry.get("base", "logits")
    if kind == "probs":
        arrays["logits"] = np.tile(np.array([0.5, 0.25, 0.125, 0.125, 0.0], np.float32), (N, T, 1))
    if kind == "soft":
        arrays["targets"] = np.tile(np.array([0.25, 0.25, 0.25, 0.125, 0.125], np.float32), (N, T, 1))
    for name in ("mask", "weights", "lengths", "class_weights", "segment_ids"):
        spec = entry.get("arrays", {}).get(name)
        if isinstance(spec, dict) and "shape" not in spec:
            arrays[name] = {"mask": np.ones((N, T), bool), "weights": np.ones((N, T), np.float32),
                            "lengths": np.array([T, T], np.int64), "segment_ids": np.zeros((N, T), np.int64),
                            "class_weights": np.ones(C, np.float32)}[name]
        elif isinstance(spec, dict):
            arrays[name] = {"mask": np.ones((1,), bool), "weights": np.ones((1,), np.float32),
                            "lengths": np.ones((1,), np.int64), "class_weights": np.ones((1,), np.float32),
                            "segment_ids": np.ones((1,), np.int64)}[name]
    options = dict(layout=entry.get("layout", "NTC"))
    options.update(entry.get("options", {}))
    return arrays, options


def apply(arrays: dict, edits: dict) -> dict:
    rng = np.random.default_rng(99)
    out = dict(arrays)
    for name, spec in edits.items():
        base = out.get(name)
        if base is None:
            base = np.zeros(0)
        out[name] = _edit(base, spec, rng)
        if name == "lengths" and out[name].dtype.kind == "i":
            out[name] = out[name].astype(np.int64)
        if name == "class_weights" and out[name].dtype.kind in "iu":
            out[name] = out[name].astype(np.float32)
    return out


def make(entry: dict) -> tuple[dict, dict]:
    """The bad inputs (arrays, options) of an entry."""
    arrays, options = base_inputs(entry)
    return apply(arrays, entry.get("arrays", {})), options


def nan_tokens(entry: dict, arrays: dict, options: dict) -> np.ndarray:
    """Boolean (N, T): the tokens that must be NaN under validate=False / tracing."""
    N, T = SHAPE["N"], SHAPE["T"]
    spec = entry["nan"]
    out = np.zeros((N, T), bool)
    if spec == "all":
        out[:] = True
    elif isinstance(spec, str) and spec.startswith("class:"):
        out[:] = arrays["targets"] == int(spec.split(":")[1])
    else:
        for idx in spec:
            out[idx] = True
    return out


def reference_inputs(entry: dict, arrays: dict, bad: np.ndarray, shift: int = 0) -> dict:
    """Valid inputs whose reference gives the expected values of every token that is not NaN (the
    mask describes the target positions: with a shift, the bad logits' targets sit shift steps on)."""
    fixed = apply(arrays, entry.get("fix", {}))
    mask = fixed.get("mask", np.ones(bad.shape, bool))
    at_targets = np.zeros_like(bad)
    at_targets[:, shift:] = bad[:, :bad.shape[1] - shift]
    fixed["mask"] = np.asarray(mask, bool) & ~at_targets
    return fixed
