"""PyTorch's ragged inputs (API.md 7.1): ``PackedSequence`` and nested jagged logits as the (R, C)
rows of the padded batch they mean (``core.ragged.Converted``), with the side arrays in the same
structure, as lists, or padded; and the results back into the caller's structure. No semantics of
its own: every form means exactly the padded batch with ``lengths``."""

from __future__ import annotations

from typing import Any

import torch

from ..._errors import XSeqLossError, XSeqLossTypeError
from ...core.ragged import FILL, Converted, check_lengths, is_list
from ...core.sides import side
from ...plan.messages import fmt_shape



class TorchRagged:
    def ragged_rows(self, kind: str, logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict,
                    reduction: str) -> Converted:
        fn = _packed if kind == "packed" else _nested
        return fn(self, logits, targets, layout=layout, lengths=lengths, sides=sides, reduction=reduction)

    def ragged_stand_in(self, kind: str, targets: Any) -> Any:
        if kind == "packed":
            data, bs = targets.data, targets.batch_sizes
            return torch.nn.utils.rnn.PackedSequence(torch.zeros(data.shape[0], 1), bs, targets.sorted_indices,
                                                     targets.unsorted_indices)
        return torch.nested.nested_tensor_from_jagged(torch.zeros(targets.values().shape[0], 1), targets.offsets())

    def padded_hidden(self, hidden: Any, scores: Any, lengths: Any) -> tuple[Any, Any, Any]:
        from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
        h, lens = pad_packed_sequence(hidden, batch_first=True)  # the caller's order; differentiable
        if isinstance(scores, PackedSequence):
            scores = pad_packed_sequence(scores, batch_first=True)[0]
        elif isinstance(scores, (list, tuple)):
            scores = torch.nn.utils.rnn.pad_sequence(list(scores), batch_first=True)
        check_lengths(lengths, lens, self, "PackedSequence hidden states")
        return h, scores, lens


def _packed(be: Any, logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict, reduction: str) -> Converted:
    P = torch.nn.utils.rnn.PackedSequence
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
    check_lengths(lengths, lens, be, "PackedSequence")

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
            return _scatter(d, rows, N, T, FILL.get(name, 0))
        if is_list(value):
            return _list_side(be, name, value, data, lens, rows, T,
                              "the PackedSequence logits hold sequences of lengths {} (caller's order)")
        v = side(be, value, name, data)
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
    if a is None or b is None:
        return a is None and b is None
    return bool(torch.equal(a.cpu(), b.cpu()))


def _show(x: Any) -> Any:
    return None if x is None else x.tolist()


def _scatter(d: Any, rows: Any, N: int, T: int, fill: Any = 0) -> Any:
    """Row values (R,) into a padded (N, T) array (``fill`` elsewhere)."""
    out = torch.full((N * T,), fill, dtype=d.dtype, device=d.device)
    return out.index_put((rows,), d).reshape(N, T)


def _list_side(be: Any, name: str, value: Any, data: Any, lens: Any, rows: Any, T: int, theirs: str) -> Any:
    """A list of per-sequence side arrays (or targets) beside packed / nested torch logits: padded
    (N, T), or soft targets as the logits' rows. ``theirs`` describes the logits' lengths ({})."""
    items = [side(be, v, f"{name}[{i}]", data) for i, v in enumerate(value)]
    got = [int(v.shape[0]) for v in items]
    if got != lens.tolist():
        raise XSeqLossError(f"{name} is a list with lengths {got} but " + theirs.format(lens.tolist()))
    if name == "targets" and items and items[0].is_floating_point():
        return _scatter_back(be.pad_stack(items, T, 0.0), rows, T)  # soft: the rows
    return be.pad_stack(items, T, FILL.get(name, 0))


def _scatter_back(padded: Any, rows: Any, T: int) -> Any:
    """Padded (N, T, C) soft targets -> their (R, C) rows."""
    return padded.reshape(-1, padded.shape[-1])[rows]


# ------------------------------------------------------------------------ PyTorch nested (jagged)

def _nested(be: Any, logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict, reduction: str) -> Converted:
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
    check_lengths(lengths, lens.cpu(), be, "nested logits")

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
            return _scatter(d, rows, N, T, FILL.get(name, 0))
        if is_list(value):
            return _list_side(be, name, value, data, lens, rows, T, "the nested logits have row lengths {}")
        v = side(be, value, name, data)
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


