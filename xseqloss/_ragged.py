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
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import _dispatch
from ._checks import fmt_shape
from ._errors import XSeqLossError, XSeqLossTypeError

SIDES = ("mask", "weights", "segment_ids")
# what the padding holds (it never counts: lengths or the mask say so); past a sequence's end the
# segment ids are padding, -1, so no document lives there
_FILL = {"segment_ids": -1}


def _is_list(x: Any) -> bool:
    return isinstance(x, (list, tuple))


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
    return (kind_of(logits) is not None or _is_list(targets) or kind_of(targets) is not None
            or any(_is_list(v) or kind_of(v) is not None for v in sides.values()))


@dataclass
class Converted:
    """What the core receives, and how the results go back into the caller's structure."""
    logits: Any
    targets: Any
    sides: dict
    layout: str
    rows: Any = None
    padded: tuple[Any, Any] | None = None
    restore: Callable[[Any], Any] = lambda r: r      # reduction "none": per-token losses back
    restore_grad: Callable[[Any], Any] = lambda g: g  # value_and_grad's gradient back


def convert(logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict, reduction: str,
            backend: Any = None, what: str = "logits") -> Converted:
    """The padded form of a ragged call (``sides``: mask, weights, segment_ids as given)."""
    kind = kind_of(logits)
    if kind is None:
        return _lists(logits, targets, layout=layout, lengths=lengths, sides=sides, backend=backend)
    if kind == "packed":
        return _packed(logits, targets, layout=layout, lengths=lengths, sides=sides, reduction=reduction)
    if kind == "nested":
        return _nested(logits, targets, layout=layout, lengths=lengths, sides=sides, reduction=reduction)
    return _tf_ragged(logits, targets, layout=layout, lengths=lengths, sides=sides, reduction=reduction)


def _check_lengths(given: Any, found: list[int] | Any, be: Any, where: str) -> None:
    if given is None:
        return
    g = [int(v) for v in np.asarray(be.to_numpy(_dispatch.side(be, given, "lengths", None))).reshape(-1)]
    f = [int(v) for v in np.asarray(found).reshape(-1)]
    if g != f:
        raise XSeqLossError(f"lengths={g} differ from the lengths of the ragged {where} {f}: give one or the "
                            f"other, or the same")


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
    tok = layout.replace("C", "")
    out = {}
    found = None
    for name, value in (("targets", targets), *sides.items()):
        if value is None or not _is_list(value):
            out[name] = value
            continue
        items = [_dispatch.side(be, v, f"{name}[{i}]", z) for i, v in enumerate(value)]
        lens = [be.shape(v)[0] if be.shape(v) else 0 for v in items]
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
        soft = name == "targets" and be.kind(items[0]) == "f" if items else False
        padded = be.pad_stack(items, T, _FILL.get(name, 0))  # (N, T) or soft (N, T, C)
        if soft:
            padded = be.moveaxis_to(padded, "NTC", layout)
        elif tok == "TN":
            padded = be.moveaxis(padded, 0, 1)
        out[name] = padded
    if found is not None:
        _check_lengths(lengths, found, be, "lists")
        lengths = np.asarray(found, np.int64)
    sides = {k: out[k] for k in sides}
    return Converted(z, out["targets"], dict(sides, lengths=lengths), layout)


# ------------------------------------------------------------------------ PyTorch PackedSequence

def _packed(logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict, reduction: str) -> Converted:
    import torch

    from .backends.torch import BACKEND as be

    P = packed_type()
    data, bs = logits.data, logits.batch_sizes
    if data.ndim != 2:
        raise XSeqLossError(f"PackedSequence logits must have data of shape (total, C), got "
                            f"{fmt_shape(tuple(data.shape))}")
    sorted_idx, unsorted_idx = logits.sorted_indices, logits.unsorted_indices
    bs_host = bs.tolist()
    N, T = (bs_host[0] if bs_host else 0), len(bs_host)
    # row r of data <-> (sorted slot b, step t); its sequence in the caller's order is sorted_idx[b]
    steps = torch.repeat_interleave(torch.arange(T), bs)
    slots = torch.cat([torch.arange(b) for b in bs_host]) if bs_host else torch.zeros(0, dtype=torch.long)
    order = slots if sorted_idx is None else sorted_idx.cpu()[slots]
    rows = (order * T + steps).to(data.device)
    lens_sorted = (bs.unsqueeze(0) > torch.arange(N).unsqueeze(1)).sum(1)  # per sorted slot
    lens = lens_sorted if sorted_idx is None else lens_sorted[unsorted_idx.cpu()]
    _check_lengths(lengths, lens, be, "PackedSequence")

    def padded(name: str, value: Any) -> Any:
        """A side array or the targets in padded (N, T) form, original order."""
        if value is None:
            return None
        if isinstance(value, P):
            if not torch.equal(value.batch_sizes, bs) or not _same(value.sorted_indices, sorted_idx):
                raise XSeqLossError(f"{name}.batch_sizes {value.batch_sizes.tolist()} (sorted_indices "
                                    f"{_show(value.sorted_indices)}) differ from the logits' {bs_host} "
                                    f"({_show(sorted_idx)}): a PackedSequence pair must be packed from the "
                                    f"same lengths")
            d = value.data.to(data.device)
            if name == "targets" and d.is_floating_point():
                return d  # soft targets stay rows, like the logits
            return _scatter(d, rows, N, T, _FILL.get(name, 0))
        if _is_list(value):
            return _list_side(be, name, value, data, lens, rows, T,
                              "the PackedSequence logits hold sequences of lengths {} (caller's order)")
        v = _dispatch.side(be, value, name, data)
        if name == "targets" and v.is_floating_point():
            raise XSeqLossTypeError("soft targets of PackedSequence logits must be a PackedSequence of the "
                                    "same batch_sizes or a list of (length, C) tensors")
        want = (N, T) if layout.replace("C", "") != "TN" else (T, N)
        if tuple(v.shape) != want:
            raise XSeqLossError(f"{name} has shape {fmt_shape(tuple(v.shape))} but the PackedSequence logits "
                                f"pad to {fmt_shape(want, layout.replace('C', ''))} (N sequences, T = the "
                                f"longest); or give {name} as a PackedSequence or a list")
        return v if want == (N, T) else v.transpose(0, 1)

    y = padded("targets", targets)
    out_sides = {k: padded(k, v) for k, v in sides.items()}
    real = torch.arange(T, device=data.device).unsqueeze(0) < lens.to(data.device).unsqueeze(1)
    m = out_sides.get("mask")
    out_sides["mask"] = real if m is None else (real & (m != 0))

    def restore(r: Any) -> Any:
        if reduction != "none":
            return r
        return P(r.reshape(-1)[rows], bs, sorted_idx, unsorted_idx)

    def restore_grad(g: Any) -> Any:
        return P(g, bs, sorted_idx, unsorted_idx)
    return Converted(data, y, out_sides, "NTC", rows=rows, padded=(N, T), restore=restore,
                     restore_grad=restore_grad)


def _same(a: Any, b: Any) -> bool:
    import torch
    if a is None or b is None:
        return a is None and b is None
    return bool(torch.equal(a.cpu(), b.cpu()))


def _show(x: Any) -> Any:
    return None if x is None else x.tolist()


def _scatter(d: Any, rows: Any, N: int, T: int, fill: Any = 0) -> Any:
    """Row values (R,) into a padded (N, T) array (``fill`` elsewhere)."""
    import torch
    out = torch.full((N * T,), fill, dtype=d.dtype, device=d.device)
    return out.index_put((rows,), d).reshape(N, T)


def _list_side(be: Any, name: str, value: Any, data: Any, lens: Any, rows: Any, T: int, theirs: str) -> Any:
    """A list of per-sequence side arrays (or targets) beside packed / nested torch logits: padded
    (N, T), or soft targets as the logits' rows. ``theirs`` describes the logits' lengths ({})."""
    items = [_dispatch.side(be, v, f"{name}[{i}]", data) for i, v in enumerate(value)]
    got = [int(v.shape[0]) for v in items]
    if got != lens.tolist():
        raise XSeqLossError(f"{name} is a list with lengths {got} but " + theirs.format(lens.tolist()))
    if name == "targets" and items and items[0].is_floating_point():
        return _scatter_back(be.pad_stack(items, T, 0.0), rows, T)  # soft: the rows
    return be.pad_stack(items, T, _FILL.get(name, 0))


def _scatter_back(padded: Any, rows: Any, T: int) -> Any:
    """Padded (N, T, C) soft targets -> their (R, C) rows."""
    return padded.reshape(-1, padded.shape[-1])[rows]


# ------------------------------------------------------------------------ PyTorch nested (jagged)

def _nested(logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict, reduction: str) -> Converted:
    import torch

    from .backends.torch import BACKEND as be

    if logits.layout != torch.jagged:
        raise XSeqLossTypeError("nested logits must use layout=torch.jagged (torch.nested.nested_tensor(..., "
                                "layout=torch.jagged)); the strided nested layout is not supported")
    data, offsets = logits.values(), logits.offsets()
    if data.ndim != 2:
        raise XSeqLossError(f"nested logits must be (N, j, C), got values of shape {fmt_shape(tuple(data.shape))}")
    lens = (offsets[1:] - offsets[:-1])
    N = int(lens.shape[0])
    T = int(lens.max()) if N else 0
    seq = torch.repeat_interleave(torch.arange(N, device=data.device), lens)
    rows = seq * T + (torch.arange(data.shape[0], device=data.device) - offsets[:-1][seq])
    _check_lengths(lengths, lens.cpu(), be, "nested logits")

    def padded(name: str, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, torch.Tensor) and value.is_nested:
            if not torch.equal(value.offsets().to(offsets.device), offsets):
                raise XSeqLossError(f"{name} has row lengths {(value.offsets()[1:] - value.offsets()[:-1]).tolist()}"
                                    f" but the nested logits have {lens.tolist()}: the same jagged structure "
                                    f"is required")
            d = value.values()
            if name == "targets" and d.is_floating_point():
                return d
            return _scatter(d, rows, N, T, _FILL.get(name, 0))
        if _is_list(value):
            return _list_side(be, name, value, data, lens, rows, T, "the nested logits have row lengths {}")
        v = _dispatch.side(be, value, name, data)
        if tuple(v.shape) != (N, T):
            raise XSeqLossError(f"{name} has shape {fmt_shape(tuple(v.shape))} but the nested logits pad to "
                                f"{fmt_shape((N, T), 'NT')}; or give {name} as a nested tensor or a list")
        return v

    y = padded("targets", targets)
    out_sides = {k: padded(k, v) for k, v in sides.items()}
    real = torch.arange(T, device=data.device).unsqueeze(0) < lens.unsqueeze(1)
    m = out_sides.get("mask")
    out_sides["mask"] = real if m is None else (real & (m != 0))

    def restore(r: Any) -> Any:
        if reduction != "none":
            return r
        return torch.nested.nested_tensor_from_jagged(r.reshape(-1)[rows], offsets, max_seqlen=T)

    def restore_grad(g: Any) -> Any:
        return torch.nested.nested_tensor_from_jagged(g, offsets, max_seqlen=T)
    return Converted(data, y, out_sides, "NTC", rows=rows, padded=(N, T), restore=restore,
                     restore_grad=restore_grad)


# ------------------------------------------------------------------------ TensorFlow RaggedTensor

def _tf_ragged(logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict, reduction: str) -> Converted:
    import tensorflow as tf

    from .backends.tensorflow import BACKEND as be

    if logits.ragged_rank != 1 or logits.shape.rank != 3:
        raise XSeqLossError(f"RaggedTensor logits must be (N, None, C) with one ragged axis, got shape "
                            f"{logits.shape} with ragged_rank {logits.ragged_rank}")
    data = logits.flat_values
    splits = logits.row_splits
    lens = logits.row_lengths()
    N = tf.shape(splits, out_type=splits.dtype)[0] - 1
    T = tf.reduce_max(tf.concat([lens, tf.zeros([1], lens.dtype)], 0))
    seq = logits.value_rowids()
    rows = seq * T + (tf.range(tf.shape(data, out_type=seq.dtype)[0], dtype=seq.dtype) - tf.gather(splits, seq))
    n_static = logits.shape[0]
    if lengths is not None:
        tf.debugging.assert_equal(tf.cast(_dispatch.side(be, lengths, "lengths", data), lens.dtype), lens,
                                  message="lengths differ from the RaggedTensor logits' row lengths")

    def padded(name: str, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, tf.RaggedTensor):
            if tf.executing_eagerly() and not bool(tf.reduce_all(tf.equal(value.row_lengths(), lens))):
                raise XSeqLossError(f"{name} has row lengths {value.row_lengths().numpy().tolist()} but the "
                                    f"RaggedTensor logits have {lens.numpy().tolist()}: the same row lengths "
                                    f"are required")
            if name == "targets" and value.flat_values.dtype.is_floating:
                return value.flat_values
            return value.to_tensor(default_value=_FILL.get(name),
                                   shape=tf.stack([N, T]) if n_static is None else None)
        v = _dispatch.side(be, value, name, data)
        return v

    y = padded("targets", targets)
    out_sides = {k: padded(k, v) for k, v in sides.items()}
    real = tf.sequence_mask(lens, T)
    m = out_sides.get("mask")
    out_sides["mask"] = real if m is None else (real & be.nonzero(m))

    def restore(r: Any) -> Any:
        if reduction != "none":
            return r
        return tf.RaggedTensor.from_row_splits(tf.gather(tf.reshape(r, [-1]), rows), splits)

    return Converted(data, y, out_sides, "NTC", rows=rows, padded=(n_static, None), restore=restore,
                     restore_grad=lambda g: g)


# ------------------------------------------------------------------------ targets alone (counts)

def padded_targets(targets: Any, *, layout: str, lengths: Any, sides: dict, backend: Any) -> tuple[Any, Any, dict]:
    """(padded targets, lengths, padded sides) for the functions that take no logits (token_count):
    lists are padded to the longest sequence; a PackedSequence, nested or ragged tensor to its own."""
    kind = kind_of(targets)
    if kind is None and not _is_list(targets):
        raise XSeqLossTypeError("side arrays given per sequence need targets given per sequence too")
    if kind is None:  # a list: pad to the longest, against stand-in logits with one class
        be, first = _dispatch.resolve(targets[0] if targets else np.zeros(0, np.int64), backend)
        T = max([int(be.shape(_dispatch.side(be, v, "targets", None))[0]) for v in targets] + [0])
        sizes = {"N": len(targets), "T": T, "C": 1}
        fake = be.zeros_shape(tuple(sizes[a] for a in layout), first)
        cv = _lists(fake, targets, layout=layout, lengths=lengths, sides=sides, backend=be.name)
        return cv.targets, cv.sides.pop("lengths"), cv.sides
    if kind == "packed":
        import torch
        data, bs = targets.data, targets.batch_sizes
        fake = torch.nn.utils.rnn.PackedSequence(torch.zeros(data.shape[0], 1), bs, targets.sorted_indices,
                                                 targets.unsorted_indices)
    elif kind == "nested":
        import torch
        fake = torch.nested.nested_tensor_from_jagged(torch.zeros(targets.values().shape[0], 1), targets.offsets())
    else:
        import tensorflow as tf
        fake = tf.RaggedTensor.from_row_splits(tf.zeros([tf.shape(targets.flat_values)[0], 1]), targets.row_splits)
    cv = convert(fake, targets, layout=layout, lengths=lengths, sides=sides, reduction="sum")
    if cv.targets is not None and kind_of(targets) and cv.rows is not None and _floating(cv.targets):
        raise XSeqLossTypeError("token_count of ragged soft targets: give them padded, with lengths")
    m = cv.sides.get("mask")
    return cv.targets, None, dict(cv.sides, mask=m)


def _floating(x: Any) -> bool:
    dt = str(getattr(x, "dtype", ""))
    return "float" in dt
