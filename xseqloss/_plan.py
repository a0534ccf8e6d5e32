"""The plan of one call (``Static``): the options and facts about the arrays that the numeric core
needs besides the arrays themselves; hashable, so JAX and TensorFlow cache one program per plan."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ._checks import Options
from ._engine import Engine

@dataclass(frozen=True)
class Static:
    """Everything the numeric core needs besides arrays; hashable (a jax.jit static argument)."""
    opts: Options
    C: int | None           # None only in token_count without class weights
    soft: bool
    eps: float              # uniform-convention smoothing ("others" converted)
    mark_bad: bool          # compute bad-token NaNs (tracing or validate=False)
    has_mask: bool
    has_lengths: bool
    has_weights: bool
    has_cw: bool
    has_normalizer: bool
    ignore: tuple[int, ...] = ()  # the ignore values a label of this backend's index dtype can hold
    engine: Engine = Engine()     # the backend's kernel and sizes for this call (_engine.py)
    has_segments: bool = False
    rows: bool = False            # ragged: z holds (R, C) rows of a padded (N, T) batch (_ragged.py)
    linear: tuple | None = None   # the fused output layer: (hidden's H axis, weight layout, chunk) (linear.py)
    class_parallel: Any = None    # classes split across workers: a process group or an axis name

    def __post_init__(self) -> None:
        # the plan a per-token kernel sees: itself, or for ragged rows and the fused layer's chunks
        # the same options on "NC" rows
        kernel = self
        if self.rows or self.linear:
            kernel = replace(self, opts=replace(self.opts, layout="NC", shift=0, reduction="none"), rows=False,
                             linear=None)
        object.__setattr__(self, "kernel", kernel)

    @property
    def shift(self) -> int:
        return self.opts.shift

    @property
    def native_default(self) -> bool:
        """The default call (plain logits, at most one ignore value, no mask, lengths, weights or
        normalizer, mean over tokens, sum or none): exactly a framework's own
        ``cross_entropy(ignore_index=...)``, which an eager backend may run directly
        (``native_default_loss``, see ``_native_default``) when that is the fastest way."""
        o = self.opts
        return (self.plain and not (self.has_mask or self.has_lengths or self.has_weights or self.has_normalizer
                                    or self.has_segments or self.rows or o.shift)
                and len(self.ignore) <= 1 and o.reduction in ("mean", "sum", "none")
                and o.denominator != "positions")

    @property
    def plain(self) -> bool:
        """Plain index cross-entropy on logits: the backend's fused native kernel applies."""
        o = self.opts
        return (not self.soft and o.inputs == "logits" and self.eps == 0.0 and not self.has_cw
                and o.z_loss == 0.0 and o.cap is None and self.class_parallel is None)


_STATIC_CACHE: dict[tuple, Static] = {}


def _static(o: Options, C: int | None, soft: bool, mark_bad: bool, *has: bool,
            limits: tuple[int, int] | None = None, engine: Engine = Engine(), has_segments: bool = False,
            rows: bool = False, linear: tuple | None = None, class_parallel: Any = None,
            store: bool = True) -> Static:
    """The call's Static, cached: most calls repeat their options and shapes. ``limits``: the range
    of the backend's label dtype when narrower than int64 (JAX without x64): an ignore value outside
    it can never match a label, and comparing with it would overflow. ``store=False`` under
    torch.compile: a cache write is a side effect dynamo must replay, and it cannot rebuild a Static."""
    key = (o, C, soft, mark_bad, has, limits, engine, has_segments, rows, linear, class_parallel)
    st = _STATIC_CACHE.get(key)
    if st is None:
        ignore = o.ignore if limits is None else tuple(v for v in o.ignore if limits[0] <= v <= limits[1])
        st = Static(o, C, soft, 0.0 if C is None else _uniform_eps(o, C), mark_bad, *has, ignore=ignore,
                    engine=engine, has_segments=has_segments, rows=rows, linear=linear,
                    class_parallel=class_parallel)
        if store and len(_STATIC_CACHE) < 1024:
            _STATIC_CACHE[key] = st
    return st


def _uniform_eps(opts: Options, C: int) -> float:
    if opts.smoothing == "others":
        return opts.eps * C / (C - 1) if C > 1 else 0.0
    return opts.eps


