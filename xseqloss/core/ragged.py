"""Ragged and packed batches in the core's terms (API.md 7.1): the (R, C) rows of the real tokens
of a padded (N, T) batch, ``rows[r]`` the flat index of row r into it. The converters that build
them from a framework's own ragged types are that framework's (``Backend.ragged_rows``); lists of
per-sequence arrays are api/ragged.py's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .._errors import XSeqLossError
from ..plan.call_plan import CallPlan
from .sides import side

# what the padding holds (it never counts: lengths or the mask say so); past a sequence's end the
# segment ids are padding, -1, so no document lives there
FILL = {"segment_ids": -1}


def is_list(x: Any) -> bool:
    return isinstance(x, (list, tuple))


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


def check_lengths(given: Any, found: list[int] | Any, be: Any, where: str) -> None:
    if given is None:
        return
    g = [int(v) for v in np.asarray(be.to_numpy(side(be, given, "lengths", None))).reshape(-1)]
    f = [int(v) for v in np.asarray(found).reshape(-1)]
    if g != f:
        raise XSeqLossError(f"lengths={g} differ from the lengths of the ragged {where} {f}: give one or the "
                            f"other, or the same")


def scatter_rows(ops: Any, v: Any, rows: Any, like: Any) -> Any:
    """A per-row array into the padded token array (0 / False where no row is)."""
    return ops.reshape_like(ops.scatter(v, rows, ops.size_of(like)), like)


def shifted_rows(ops: Any, st: CallPlan, t: Any, rows: Any, like: Any) -> Any:
    """Soft-target rows at their logits' rows under ``shift``: row r (sequence n, step t) takes the
    row of (n, t + k). Where none exists (t + k past the sequence) any row will do: no position
    exists there, so it never counts."""
    T = ops.dim(like, 1)
    of = ops.scatter(ops.arange(ops.dim(rows, 0), like=rows), rows, ops.size_of(like))  # flat -> row
    step = rows % T
    target = ops.where(step + st.shift < T, rows + st.shift, rows)
    return ops.take(t, ops.take(of, target))
