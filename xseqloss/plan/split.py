"""Classes split across workers (API.md 9.2) as data: one worker's place in the split (``Split``),
and the contract of the collectives the core combines its class sums with (``Reducer``).

The core (``core/token_loss.py``) writes every formula once over a ``Reducer``; each engine's
reducer is beside its backend (``backends/torch/class_parallel.py``, ``backends/jax/class_parallel.py``)
and is handed out by the backend (``Backend.reducer``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .call_plan import CallPlan, uniform_eps


@dataclass(frozen=True)
class Split:
    """One worker's place in the class split (part of the call's plan)."""
    engine: str                 # "torch" or "jax"
    handle: Any                 # a torch ProcessGroup, or a JAX axis name (str or tuple of str)
    local: int                  # classes on this worker
    C: int                      # classes on all workers together
    lo: int | None = None       # torch: this worker's first class (JAX: axis_index * local, traced)
    sizes: tuple = ()           # torch: every worker's slice size, in rank order
    rank: int = 0
    padded: bool = False        # JAX: the slices hold more columns than C; those past C are padding

    def describe(self) -> str:
        if self.engine == "torch":
            return (f"class_parallel rank {self.rank} of {len(self.sizes)}, holding classes [{self.lo}, "
                    f"{self.lo + self.local}) of C = {self.C}")
        return f"class_parallel axis {self.handle!r}, {self.local} classes per device of C = {self.C}"


def with_split(plan: CallPlan, split: Split) -> CallPlan:
    """The call's plan over the global C."""
    return replace(plan, C=split.C, eps=uniform_eps(plan.opts, split.C), class_parallel=split)


class Reducer:
    """The collectives of the core for one engine, over the workers of ``split``:

    * ``max(v)``: the elementwise max over the workers (no gradient);
    * ``sums(vs)``: a list of arrays summed over the workers in one all-reduce (backward: the
      identity, since the sums are replicated);
    * ``labels(y)``: this worker's column of each global label, and whether this worker holds it;
    * ``valid(x, k)``: JAX only, the columns (along axis k) that are real classes, not padding;
    * ``take(vec, y)``: vec[y] of a class-sharded vector, from the worker that holds y;
    * ``offset(like)``: this worker's first global class (an int, or a traced scalar).
    """

    def __init__(self, split: Split) -> None:
        self.split = split

    def max(self, v: Any) -> Any:
        raise NotImplementedError

    def sums(self, vs: list) -> list:
        raise NotImplementedError

    def labels(self, y: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def valid(self, x: Any, k: int) -> Any:
        raise NotImplementedError

    def offset(self, like: Any) -> Any:
        raise NotImplementedError

    def _where(self, c: Any, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def take(self, vec: Any, y: Any) -> Any:
        yl, own = self.labels(y)
        return self.sums([self._where(own, vec[yl], 0.0)])[0]
