"""The plan of one call (``CallPlan``): the options and the facts about the arrays that the core
needs besides the arrays themselves. Plain, frozen, hashable data: JAX and TensorFlow cache one
compiled program per plan, and a custom op can rebuild the per-row part from primitives."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from .engine import Engine
from .options import Options


@dataclass(frozen=True)
class LinearLayout:
    """The fused output layer's geometry (``linear_cross_entropy``): hidden's H axis, the weight's
    layout (\"CH\" or \"HC\") and the tokens per chunk."""
    h_axis: int
    weight_layout: str
    chunk: int


@dataclass(frozen=True)
class StatsPlan:
    """What ``token_stats`` computes (API.md 11): the outputs asked for, the temperature as a
    Python number folded into the program (``temperature``; None when it is an array:
    ``temp_array`` says "scalar" for a 0-d array, "sequence" for (N,), "tokens" for the targets'
    token shape) and the number of ids per token (0: no ids)."""
    outputs: tuple[str, ...]
    temperature: float | None = 1.0
    temp_array: str = ""
    n_ids: int = 0
    metrics: bool = False   # return_stats of a loss: the outputs carry no gradient


@dataclass(frozen=True)
class CallPlan:
    """Everything the core needs besides the arrays; hashable (a jax.jit static argument)."""
    opts: Options
    C: int | None           # None only in token_count without class weights
    soft: bool
    eps: float              # uniform-convention smoothing ("others" converted)
    mark_nan: bool          # bad tokens give NaN instead of an error (tracing or validate=False)
    has_mask: bool
    has_lengths: bool
    has_weights: bool
    has_cw: bool
    has_normalizer: bool
    ignore: tuple[int, ...] = ()  # the ignore values a label of this backend's index dtype can hold
    engine: Engine = Engine()     # the backend's kernel and sizes for this call (engine.py)
    has_segments: bool = False
    rows: bool = False            # ragged: z holds (R, C) rows of a padded (N, T) batch (api/ragged.py)
    linear: LinearLayout | None = None  # the fused output layer (linear.py)
    class_parallel: Any = None    # classes split across workers: a ``split.Split``
    stats: StatsPlan | None = None  # per-token outputs (token_stats, or a loss's return_stats)

    def __post_init__(self) -> None:
        # the plan a per-row kernel sees: itself, or for ragged rows and the fused layer's chunks
        # the same options on "NC" rows
        row_plan = self
        if self.rows or self.linear:
            row_plan = replace(self, opts=replace(self.opts, layout="NC", shift=0, reduction="none"), rows=False,
                               linear=None)
        object.__setattr__(self, "row_plan", row_plan)
        # hashed once: a plan is a key of the per-plan program caches on every call (jax.jit's
        # static argument), and the generated hash walked every nested field each time
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in fields(self))))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined,no-any-return]

    @property
    def shift(self) -> int:
        return self.opts.shift

    @property
    def default_call(self) -> bool:
        """The default call (plain logits, at most one ignore value, no mask, lengths, weights or
        normalizer, mean over tokens, sum or none): exactly a framework's own
        ``cross_entropy(ignore_index=...)``, which an eager backend may run directly
        (``Backend.default_token_loss``, see ``loss._default_call``) when that is the fastest way."""
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
                and o.z_loss == 0.0 and o.cap is None and self.class_parallel is None and self.stats is None)


_PLAN_CACHE: dict[tuple, CallPlan] = {}


def make_plan(o: Options, C: int | None, soft: bool, mark_nan: bool, *has: bool,
            limits: tuple[int, int] | None = None, engine: Engine = Engine(), has_segments: bool = False,
            rows: bool = False, linear: LinearLayout | None = None, class_parallel: Any = None,
            store: bool = True, stats: StatsPlan | None = None) -> CallPlan:
    """The call's plan, cached: most calls repeat their options and shapes. ``limits``: the range
    of the backend's label dtype when narrower than int64 (JAX without x64): an ignore value outside
    it can never match a label, and comparing with it would overflow. ``store=False`` under
    torch.compile: a cache write is a side effect dynamo must replay, and it cannot rebuild a plan."""
    key = (o, C, soft, mark_nan, has, limits, engine, has_segments, rows, linear, class_parallel, stats)
    st = _PLAN_CACHE.get(key)
    if st is None:
        ignore = o.ignore if limits is None else tuple(v for v in o.ignore if limits[0] <= v <= limits[1])
        st = CallPlan(o, C, soft, 0.0 if C is None else uniform_eps(o, C), mark_nan, *has, ignore=ignore,
                    engine=engine, has_segments=has_segments, rows=rows, linear=linear,
                    class_parallel=class_parallel, stats=stats)
        if store and len(_PLAN_CACHE) < 1024:
            _PLAN_CACHE[key] = st
    return st


def uniform_eps(opts: Options, C: int) -> float:
    """label_smoothing in the uniform convention (\"others\" is eps * C / (C - 1))."""
    if opts.smoothing == "others":
        return opts.eps * C / (C - 1) if C > 1 else 0.0
    return opts.eps
