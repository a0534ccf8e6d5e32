"""The message formats of the error catalogue: shapes with their axis letters, positions, and the
layout a wrong shape suggests. Plain data in, strings (or the exception to raise) out."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from .._errors import XSeqLossError


def fmt_shape(shape: Sequence[Any], letters: str | None = None) -> str:
    dims = ["?" if d is None else str(d) for d in shape]
    if letters is None or len(letters) != len(dims):
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
    return "(" + ", ".join(f"{a}={d}" for a, d in zip(letters, dims)) + ")"


def same_shape(got: Sequence[Any], want: Sequence[Any]) -> bool:
    return len(got) == len(want) and all(g is None or w is None or g == w for g, w in zip(got, want))


def fitting_layouts(logits_shape: Sequence[Any], layout: str, targets_shape: Sequence[Any],
                    soft: bool) -> list[str]:
    """Other layouts (same letters) under which targets' shape would fit the logits."""
    fits = []
    for perm in itertools.permutations(layout):
        cand = "".join(perm)
        if cand == layout:
            continue
        want = list(logits_shape) if soft else [d for d, a in zip(logits_shape, cand) if a != "C"]
        if same_shape(targets_shape, want):
            fits.append(cand)
    # the usual mistake is only the class axis in the wrong place: prefer layouts that keep N/T order
    same_order = [f for f in fits if f.replace("C", "") == layout.replace("C", "")]
    return same_order or fits


def layouts_with_classes(shape: Sequence[Any], layout: str, num_classes: int) -> list[str]:
    """Layouts keeping the N/T order of ``layout`` whose C axis has size ``num_classes``."""
    rest = layout.replace("C", "")
    fits = []
    for pos in range(len(layout)):
        cand = rest[:pos] + "C" + rest[pos:]
        if cand != layout and shape[pos] == num_classes:
            fits.append(cand)
    return fits


def suggest(fits: list[str]) -> str:
    if not fits:
        return ""
    return " - did you mean " + " or ".join(f'layout="{f}"' for f in fits[:3]) + "?"


def position(index: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def shape_error(argument: str, got: Sequence[Any], want: Sequence[Any], letters: str, extra: str = "") -> XSeqLossError:
    return XSeqLossError(
        f"{argument} has shape {fmt_shape(got)} but must be {fmt_shape(want, letters)}; "
        f"broadcasting is not allowed{extra}")
