"""The upstream rule, written once: a kernel that formed its gradient during the forward pass for
the upstream gradient it expected (``formed``, from ``TokenRules.expected_dl``) must give the
gradient for the upstream that really arrives (``dl``).

* ``dl`` is ``formed`` exactly (``loss.backward()`` of the reduced loss): the formed gradient is
  the answer, with no pass at all;
* per row (``per_row=True``: a gradient of the logits, one row per token): each row is scaled by
  dl / formed; a row formed with factor 0 that now needs a nonzero one must be formed again, except
  for NaN (a NaN upstream makes the row NaN: 0 * NaN), so ``again`` says when;
* uniform (``per_row=False``: gradients summed over the tokens, the fused layer's d weight): only a
  common multiple r of ``formed`` can be applied (a scaled loss, GradScaler); anything else
  (``reduction="none"`` with an arbitrary cotangent, Liger-Kernel issue 968) forms the gradients
  again with ``dl``.

Rows that do not count (``keep`` false) have exactly zero gradient whatever either upstream holds
there. The results are arrays; the caller's control flow stays native (an eager ``if`` on
``bool(...)``, ``tf.cond``, ``jnp.where`` / a loop's trip count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Upstream:
    exact: Any    # bool array: dl == formed everywhere (the formed gradient is the answer)
    factor: Any   # per_row: token-shaped multiplier; uniform: the scalar r
    again: Any    # bool array: the gradient must be formed again with dl


def _kept(ops: Any, dl: Any, formed: Any, keep: Any) -> tuple[Any, Any]:
    if keep is None:
        return dl, formed
    return ops.where(keep, dl, 0.0), ops.where(keep, formed, 0.0)


def is_formed(ops: Any, dl: Any, formed: Any, keep: Any = None) -> Any:
    """Bool array: ``dl`` is the upstream the gradient was formed for (the common case, checked
    first by eager callers: nothing else is computed then)."""
    dl, formed = _kept(ops, dl, formed, keep)
    return ops.all(dl == formed, None)


def upstream(ops: Any, dl: Any, formed: Any, keep: Any = None, per_row: bool = True) -> Upstream:
    """The whole rule (see the module docstring); ``keep``: the rows that count, or None."""
    dl, formed = _kept(ops, dl, formed, keep)
    exact = ops.all(dl == formed, None)
    nz = formed != 0
    safe = ops.where(nz, formed, 1.0)
    if per_row:
        factor = ops.where(nz, dl / safe, dl * 0.0)  # NaN stays NaN, 0 stays 0
        again = ops.any(~nz & (dl != 0) & ~(dl != dl), None)  # dl != dl: NaN
        return Upstream(exact, factor, again)
    ratio = ops.where(nz, dl / safe, 0.0)
    r = ops.max(ops.where(nz, ratio, -float("inf")), None)
    r = ops.where(ops.any(nz, None), r, 0.0)
    uniform = ops.all(ops.where(nz, ratio == r, dl == 0), None)
    return Upstream(exact, r, ~uniform)
