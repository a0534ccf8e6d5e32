"""The options of one call, checked and parsed into a frozen, hashable ``Options`` (plain data:
no arrays, no frameworks). Value checks that read array contents are ``core/checks.py`` (the flags)
and ``api/validate.py`` (the messages); shape messages are ``messages.py``."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Sequence

from .._errors import XSeqLossError, XSeqLossTypeError

INPUTS = ("logits", "log_probs", "probs")
SMOOTHING = ("uniform", "others")
REDUCTIONS = ("none", "sum", "mean", "per_sequence", "per_position", "sequence_mean", "per_segment",
              "segment_mean")
DENOMINATORS = ("weights", "tokens", "positions")
EMPTY = ("zero", "nan")
PROB_EPS = 1e-7  # Keras' epsilon for inputs="probs"


def choice(value: Any, argument: str, valid: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise XSeqLossError(f"{argument}={value!r} is not valid; valid values are {list(valid)}")
    return value


def number(value: Any, argument: str, lo: float, hi: float = math.inf, *, lo_open: bool = False,
           integer: bool = False) -> float:
    """A Python (or NumPy scalar) real number within [lo, hi] (or (lo, hi] with lo_open)."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a real number"
        raise XSeqLossTypeError(f"{argument} must be {what}, got {value!r} of type {type(value).__name__}")
    v = float(value)
    left = "(" if lo_open else "["
    right = "]" if math.isfinite(hi) else ")"
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
        raise XSeqLossError(f"{argument}={value!r} is out of range: valid range is {left}{lo:g}, {hi:g}{right}")
    return v


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _ignore_value(v: Any, where: str) -> int | None:
    """``v`` as a Python int when it is an integer (a Python or NumPy int, or a 0-d integer array or
    tensor of any framework, concrete), None when it is not integer-like; bools are not integers.
    Values outside int64 are an error: no label can hold them."""
    dtype = getattr(v, "dtype", None)
    if isinstance(v, bool) or (dtype is not None and "bool" in str(dtype)):
        return None
    if isinstance(v, numbers.Integral):
        i = int(v)
    else:
        if dtype is None or "int" not in str(dtype) or getattr(v, "ndim", len(getattr(v, "shape", ()) or ())) != 0:
            return None  # not an integer dtype (every framework's dtype names its kind), or not 0-d
        try:
            i = operator.index(v)  # integer 0-d arrays and tensors; floats refuse (TypeError)
        except TypeError as exc:
            if "oncrete" in str(exc) or "racer" in str(exc):  # a traced value (jax.jit)
                raise XSeqLossTypeError(f"{where} must be a concrete int (a static option), got a traced "
                                        f"array; pass a Python int") from None
            return None
    if not _INT64[0] <= i <= _INT64[1]:
        raise XSeqLossError(f"{where}={i} is out of range: labels are int64, valid range "
                            f"[{_INT64[0]}, {_INT64[1]}]")
    return i


def parse_ignore(ignore_index: Any) -> tuple[int, ...]:
    """None, an int (Python, NumPy, a 0-d integer array or tensor), or a collection of them."""
    if ignore_index is None:
        return ()
    one = _ignore_value(ignore_index, "ignore_index")
    if one is not None:
        return (one,)
    if isinstance(ignore_index, (str, bytes)) or not hasattr(ignore_index, "__iter__") \
            or getattr(ignore_index, "ndim", 1) == 0:
        raise XSeqLossTypeError(
            f"ignore_index must be an int, a collection of ints, or None; got {ignore_index!r}")
    values = []
    for i, v in enumerate(ignore_index):
        iv = _ignore_value(v, f"ignore_index[{i}]")
        if iv is None:
            raise XSeqLossTypeError(f"ignore_index[{i}] = {v!r} is not an int; ignore_index must hold ints")
        values.append(iv)
    return tuple(sorted(set(values)))


def plain_ignore(ignore_index: Any) -> int | tuple[int, ...] | None:
    """ignore_index as plain Python values (None, an int, or a tuple of ints), checked: what the
    torch Module and the Keras loss keep and serialise (no arrays or tensors held)."""
    values = parse_ignore(ignore_index)  # checked (sorted, unique)
    if ignore_index is None:
        return None
    if _ignore_value(ignore_index, "ignore_index") is not None:
        return values[0]
    return tuple(_ignore_value(v, "ignore_index") for v in ignore_index)  # as given: configs round-trip


def parse_layout(layout: Any, argument: str = "layout", letters: str = "NTC", required: str = "C") -> str:
    if not isinstance(layout, str) or not layout or any(c not in letters for c in layout) \
            or len(set(layout)) != len(layout) or any(c not in layout for c in required):
        raise XSeqLossError(
            f"{argument}={layout!r} is not valid: use the letters {', '.join(letters)} once each in the "
            f"order of the axes, with {' and '.join(required)} required (e.g. {letters!r})")
    return layout


@dataclass(frozen=True)
class Options:
    """The static (hashable) options of one call, validated."""
    layout: str
    ignore: tuple[int, ...]
    inputs: str
    eps: float            # label smoothing as given
    smoothing: str
    z_loss: float
    cap: float | None
    reduction: str
    denominator: str
    empty: str
    num_classes: int | None
    validate: bool
    inplace: bool
    shift: int = 0

    @property
    def k(self) -> int:
        return self.layout.index("C")

    @property
    def tok_layout(self) -> str:
        return self.layout.replace("C", "")


_OPTIONS_CACHE: dict[tuple, Options] = {}


_SIMPLE = (int, float, str, bool, type(None))


def _typed(v: Any) -> Any:
    """A cache key for an option value that tells apart values equal across types, at any depth:
    1 == 1.0 == True and (1, 2) == (1.0, 2.0) == (True, 2) must not share an entry, since one is
    valid and the others are errors (issue 17). Anything but plain values and tuples of them
    (arrays, tensors, lists) raises TypeError: it is parsed every time, never cached."""
    t = type(v)
    if t in _SIMPLE:
        return (t, v)
    if t is tuple:
        return (tuple, tuple(_typed(e) for e in v))
    raise TypeError("not cacheable")


def parse_options(**kw: Any) -> Options:
    """Validated options; cached per distinct set of (hashable) values, since most calls repeat them."""
    try:
        key = (tuple(kw), tuple(_typed(v) for v in kw.values()))
        hit = _OPTIONS_CACHE.get(key)
    except TypeError:  # an array, a tensor, a list of ignore indices: parse it every time
        return _parse_options(**kw)
    if hit is None:
        hit = _parse_options(**kw)
        if len(_OPTIONS_CACHE) < 1024:
            _OPTIONS_CACHE[key] = hit
    return hit


def _parse_options(*, layout: Any, ignore_index: Any, inputs: Any, label_smoothing: Any, smoothing: Any,
                   z_loss: Any, logit_softcap: Any, reduction: Any, denominator: Any, empty: Any,
                   num_classes: Any, validate: Any, inplace_backward: Any, shift: Any = 0) -> Options:
    layout = parse_layout(layout)
    inputs = choice(inputs, "inputs", INPUTS)
    eps = number(label_smoothing, "label_smoothing", 0.0, 1.0)
    smoothing = choice(smoothing, "smoothing", SMOOTHING)
    zl = number(z_loss, "z_loss", 0.0)
    cap = None if logit_softcap is None else number(logit_softcap, "logit_softcap", 0.0, lo_open=True)
    reduction = choice(reduction, "reduction", REDUCTIONS)
    denominator = choice(denominator, "denominator", DENOMINATORS)
    empty = choice(empty, "empty", EMPTY)
    if num_classes is not None:
        num_classes = int(number(num_classes, "num_classes", 1, integer=True))
    if not isinstance(validate, bool):
        raise XSeqLossTypeError(f"validate must be True or False, got {validate!r}")
    if not isinstance(inplace_backward, bool):
        raise XSeqLossTypeError(f"inplace_backward must be True or False, got {inplace_backward!r}")
    if inputs != "logits":
        for name, active in (("z_loss", zl > 0), ("logit_softcap", cap is not None)):
            if active:
                raise XSeqLossError(f'{name} acts on raw logits and needs inputs="logits", got inputs={inputs!r}')
    need = {"per_sequence": "N", "sequence_mean": "N", "per_position": "T", "per_segment": "T",
            "segment_mean": "T"}.get(reduction)
    if need and need not in layout:
        raise XSeqLossError(
            f"reduction={reduction!r} needs a {'batch (N)' if need == 'N' else 'time (T)'} axis, "
            f"but layout={layout!r} has none")
    shift = int(number(shift, "shift", 0, integer=True))
    if shift and "T" not in layout:
        raise XSeqLossError(f"shift={shift} moves targets along the time axis (T), but layout={layout!r} has "
                            f"none; valid: shift=0 without T")
    return Options(layout, parse_ignore(ignore_index), inputs, eps, smoothing, zl, cap, reduction,
                   denominator, empty, num_classes, validate, inplace_backward, shift)


def normalizer_reduction(reduction: str) -> None:
    """``normalizer`` replaces D of "mean", N of "sequence_mean" and the number of documents of
    "segment_mean"; anywhere else it is an error."""
    if reduction not in ("mean", "sequence_mean", "segment_mean"):
        raise XSeqLossError(f"normalizer replaces the denominator of reduction='mean', 'sequence_mean' or 'segment_mean'; "
                            f"it has no meaning with reduction={reduction!r}")



STAT_OUTPUTS = ("log_prob", "entropy", "lse", "argmax", "correct", "ids_log_prob")


def parse_outputs(outputs: Any, argument: str, *, has_targets: bool, has_ids: bool | None) -> tuple[str, ...]:
    """The per-token outputs asked for (API.md 11), in the order of ``STAT_OUTPUTS``; checked:
    known names, "log_prob" and "correct" need targets, "ids_log_prob" exactly when ids are given
    (``has_ids=None``: ids are not an option here, as for a loss's return_stats)."""
    names = (outputs,) if isinstance(outputs, str) else outputs
    if not isinstance(names, (tuple, list)) or not names or not all(isinstance(n, str) for n in names):
        raise XSeqLossTypeError(f"{argument} must be a name or a tuple of names out of {list(STAT_OUTPUTS)}, "
                                f"got {outputs!r}")
    for n in names:
        if n not in STAT_OUTPUTS or (has_ids is None and n == "ids_log_prob"):
            valid = [v for v in STAT_OUTPUTS if has_ids is not None or v != "ids_log_prob"]
            raise XSeqLossError(f"{argument} names {n!r}, which is not an output; valid names are {valid}")
    if not has_targets:
        for n in ("log_prob", "correct"):
            if n in names:
                raise XSeqLossError(f"{argument} asks for {n!r}, which needs targets (the class whose "
                                    f"{'log-probability' if n == 'log_prob' else 'prediction'} it is); targets=None")
    if has_ids is not None and has_ids != ("ids_log_prob" in names):
        raise XSeqLossError("ids gives the classes of 'ids_log_prob', and 'ids_log_prob' is in outputs exactly when "
                            f"ids is given: got ids={'an array' if has_ids else 'None'} with outputs={tuple(names)!r}")
    return tuple(n for n in STAT_OUTPUTS if n in names)


def parse_temperature(temperature: Any) -> float | None:
    """A Python number (a finite temperature > 0, folded into the program), or None for an array
    (checked by shape and, eagerly, by value where it is given)."""
    if isinstance(temperature, bool):
        raise XSeqLossTypeError(f"temperature must be a number or an array, got {temperature!r}")
    if isinstance(temperature, numbers.Real):
        v = float(temperature)
        if not math.isfinite(v) or v <= 0:
            raise XSeqLossError(f"temperature={temperature!r} is out of range: it must be finite and > 0, "
                                f"valid range (0, inf)")
        return v
    return None
