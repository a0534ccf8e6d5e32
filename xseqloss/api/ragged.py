"""Ragged and packed inputs as users hold them (API.md 7.1): the edge, with no semantics of its own.

Every form means exactly the padded batch with ``lengths``; this module turns it into that, and
the results back into the caller's structure:

* ``targets`` (and ``mask``, ``weights``, ``segment_ids``) as a list or tuple of 1-D arrays, one
  per sequence, with padded logits in any layout with N and T: padded here (token-sized arrays);
* PyTorch ``PackedSequence`` logits, PyTorch nested jagged tensors and TensorFlow ``RaggedTensor``
  logits: their (R, C) data holds only the real tokens. They are never padded (that would copy the
  logits): the core computes the per-token loss on the rows and places it in the padded (N, T)
  token arrays (``rows``: each row's flat index into them, in the caller's original sequence order).

The side arrays may come in the logits' own structure (a PackedSequence of the same
``batch_sizes``, a nested or ragged tensor of the same row lengths), as a list, or padded
(N, T) ("NTC"; (T, N) with layout "TNC"). Structures that do not match are errors naming both.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .. import _dispatch
from .._errors import XSeqLossError, XSeqLossTypeError
from ..core import common
from ..core.ragged import FILL, Converted, check_lengths, is_list
from ..core.sides import side
from ..plan.messages import fmt_shape

SIDES = ("mask", "weights", "segment_ids")
_FRAMEWORK = {"packed": "torch", "nested": "torch", "ragged": "tensorflow"}


def packed_type() -> Any:
    torch = sys.modules.get("torch")
    return None if torch is None else torch.nn.utils.rnn.PackedSequence


def kind_of(x: Any) -> str | None:
    """"packed", "nested", "ragged" for a ragged logits type, else None (never imports anything)."""
    P = packed_type()
    if P is not None and isinstance(x, P):
        return "packed"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor) and x.is_nested:
        return "nested"
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "RaggedTensor") and isinstance(x, tf.RaggedTensor):
        return "ragged"
    return None


def is_ragged(logits: Any, targets: Any, sides: dict) -> bool:
    return (kind_of(logits) is not None or is_list(targets) or kind_of(targets) is not None
            or any(v is not None and (is_list(v) or kind_of(v) is not None) for v in sides.values()))


def convert(logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict, reduction: str,
            backend: Any = None, what: str = "logits") -> Converted:
    """The padded form of a ragged call (``sides``: mask, weights, segment_ids as given)."""
    kind = kind_of(logits)
    if kind is None:
        return _lists(logits, targets, layout=layout, lengths=lengths, sides=sides, backend=backend)
    return _dispatch.load(_FRAMEWORK[kind]).ragged_rows(kind, logits, targets, layout=layout, lengths=lengths,
                                                         sides=sides, reduction=reduction)


# ------------------------------------------------------------------------ lists with padded logits

def _lists(logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict, backend: Any) -> Converted:
    be, z = _dispatch.resolve(logits, backend)
    if "N" not in layout or "T" not in layout:
        raise XSeqLossError(f"a list of per-sequence targets needs padded logits with N and T in the layout, "
                            f"got layout={layout!r}")
    shape = be.shape(z)
    if len(shape) != len(layout):
        raise XSeqLossError(f"logits have {len(shape)} axes, shape {fmt_shape(shape)}, but layout={layout!r} "
                            f"names {len(layout)}; give one letter per axis")
    N, T = shape[layout.index("N")], shape[layout.index("T")]
    C = shape[layout.index("C")] if "C" in layout else None
    tok = layout.replace("C", "")
    out = {}
    found = None
    for name, value in (("targets", targets), *sides.items()):
        if value is None or not is_list(value):
            out[name] = value
            continue
        items = [side(be, v, f"{name}[{i}]", z) for i, v in enumerate(value)]
        soft = _check_items(be, name, items, C)
        lens = [be.shape(v)[0] for v in items]
        if len(items) != N:
            raise XSeqLossError(f"{name} is a list of {len(items)} sequences but the logits have N = {N} "
                                f"(shape {fmt_shape(shape, layout)})")
        if found is not None and lens != found:
            raise XSeqLossError(f"{name} has per-sequence lengths {lens} but targets have {found}: a "
                                f"list per sequence must match the targets'")
        found = lens if found is None else found
        for i, n in enumerate(lens):
            if n > T:
                raise XSeqLossError(f"{name}[{i}] has {n} steps but the logits have T = {T} (shape "
                                    f"{fmt_shape(shape, layout)}): padded logits need T >= the longest sequence")
        padded = be.pad_stack(items, T, FILL.get(name, 0))  # (N, T) or soft (N, T, C)
        if soft:
            padded = common.moveaxis_to(be, padded, "NTC", layout)
        elif tok == "TN":
            padded = be.moveaxis(padded, 0, 1)
        out[name] = padded
    if found is not None and not (found and all(n == T for n in found)):
        check_lengths(lengths, found, be, "lists")
        lengths = np.asarray(found, np.int64)
    # else every item has the logits' full T: a rectangular batch (API.md section 1), as if it were
    # one array; ``lengths`` (if given) say where each sequence ends, as for any padded batch
    sides = {k: out[k] for k in sides}
    return Converted(z, out["targets"], dict(sides, lengths=lengths), layout)


def _check_items(be: Any, name: str, items: list, C: Any) -> bool:
    """The items of a per-sequence list, checked before they are stacked: each one sequence's 1-D
    array (soft targets: (steps, C)), all of one kind. Returns whether they are soft targets."""
    kinds = [be.kind(v) for v in items]
    for i, v in enumerate(items):
        shape = be.shape(v)
        if len(shape) == 0:
            raise XSeqLossError(f"{name}[{i}] is 0-d (a single value, shape ()): a list of per-sequence {name} "
                                f"holds one 1-D array of steps per sequence" +
                                (" (soft targets: (steps, C))" if name == "targets" else ""))
        if name == "targets" and kinds[i] == "f":
            if len(shape) == 1:
                raise XSeqLossTypeError(
                    f"targets[{i}] has a floating dtype ({be.dtype_name(v)}) and shape {fmt_shape(shape)}: class "
                    f"ids must be integers (floats are never truncated); soft targets per sequence are "
                    f"(steps, C = {C}) arrays")
            if len(shape) != 2 or (C is not None and shape[1] != C):
                raise XSeqLossError(f"targets[{i}] has shape {fmt_shape(shape)} but soft targets per sequence "
                                    f"must be (steps, C = {C})")
        elif len(shape) != 1:
            raise XSeqLossError(f"{name}[{i}] has shape {fmt_shape(shape)} but must be 1-D (steps,): one value "
                                f"per step of sequence {i}")
    group = {"f": "floating", "b": "bool"}
    for i, kind in enumerate(kinds):
        if group.get(kind, "integer") != group.get(kinds[0], "integer"):
            what = ("soft targets (floating)" if kind == "f" else "class ids (integers)") if name == "targets" \
                else f"{group.get(kind, 'integer')} ({be.dtype_name(items[i])})"
            first = ("soft targets (floating)" if kinds[0] == "f" else "class ids (integers)") if name == "targets" \
                else f"{group.get(kinds[0], 'integer')} ({be.dtype_name(items[0])})"
            raise XSeqLossTypeError(f"{name}[{i}] is {what} but {name}[0] is {first}: every item of a per-sequence "
                                    f"list must be of one kind (nothing is cast for you)")
    return name == "targets" and bool(kinds) and kinds[0] == "f"


# ------------------------------------------------------------------------ targets alone (counts)

def padded_targets(targets: Any, *, layout: str, lengths: Any, sides: dict, backend: Any) -> tuple[Any, Any, dict]:
    """(padded targets, lengths, padded sides) for the functions that take no logits (token_count):
    lists are padded to the longest sequence; a PackedSequence, nested or ragged tensor to its own."""
    kind = kind_of(targets)
    if kind is None and not is_list(targets):
        raise XSeqLossTypeError("side arrays given per sequence need targets given per sequence too")
    if kind is None:  # a list: pad to the longest, against stand-in logits with one class
        be, first = _dispatch.resolve(targets[0] if targets else np.zeros(0, np.int64), backend)
        T = max([int((be.shape(side(be, v, "targets", None)) or (0,))[0]) for v in targets] + [0])  # 0-d: _lists says
        sizes = {"N": len(targets), "T": T, "C": 1}
        fake = be.zeros_shape(tuple(sizes[a] for a in layout), first)
        cv = _lists(fake, targets, layout=layout, lengths=lengths, sides=sides, backend=be.name)
        return cv.targets, cv.sides.pop("lengths"), cv.sides
    fake = _dispatch.load(_FRAMEWORK[kind]).ragged_stand_in(kind, targets)
    cv = convert(fake, targets, layout=layout, lengths=lengths, sides=sides, reduction="sum")
    if cv.targets is not None and kind_of(targets) and cv.rows is not None and _floating(cv.targets):
        raise XSeqLossTypeError("token_count of ragged soft targets: give them padded, with lengths")
    m = cv.sides.get("mask")
    return cv.targets, None, dict(cv.sides, mask=m)


def _floating(x: Any) -> bool:
    dt = str(getattr(x, "dtype", ""))
    return "float" in dt
