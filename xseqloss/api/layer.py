"""The fused output layer's arrays (``linear_cross_entropy``, ``linear_token_stats``): hidden, weight
and bias checked against each other, the logits' shape they mean, and the chunk size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _dispatch
from .._errors import XSeqLossError, XSeqLossTypeError
from ..core.sides import side
from ..plan import engine
from ..plan.call_plan import LinearLayout, make_plan
from ..plan.messages import fmt_shape
from ..plan.options import choice, number, parse_layout
from .prepare import CLASS_SLICE, Call

WEIGHT_LAYOUTS = ("CH", "HC")


@dataclass
class LayerArrays:
    be: Any
    h: Any
    w: Any
    b: Any
    hidden_layout: str
    weight_layout: str
    layout: str            # the logits' layout it means (H -> C)
    shape: tuple           # the logits' shape it means
    C: int
    tokens: int            # hidden's token count (1 when unknown)
    chunk_size: int | None


def layer_arrays(hidden: Any, weight: Any, bias: Any, layout: Any, weight_layout: Any, chunk_size: Any,
                 backend: Any) -> LayerArrays:
    hl = parse_layout(layout, "layout", letters="NTH", required="H")
    wl = choice(weight_layout, "weight_layout", WEIGHT_LAYOUTS)
    if chunk_size is not None:
        chunk_size = int(number(chunk_size, "chunk_size", 1, integer=True))
    be, h = _dispatch.resolve(hidden, backend)
    if be.kind(h) != "f":
        raise XSeqLossTypeError(f"hidden must have a floating dtype, got {be.dtype_name(h)}; integer hidden "
                                f"states are never cast for you")
    hshape = be.shape(h)
    if len(hshape) != len(hl):
        raise XSeqLossError(f"hidden has {len(hshape)} axes, shape {fmt_shape(hshape)}, but layout={hl!r} names "
                            f"{len(hl)}; give one letter per axis")
    H = hshape[hl.index("H")]
    w = side(be, weight, "weight", h)
    if be.kind(w) != "f" or be.dtype_name(w) != be.dtype_name(h):
        raise XSeqLossTypeError(f"weight has dtype {be.dtype_name(w)} but hidden has {be.dtype_name(h)}: hidden, "
                                f"weight and bias share one floating dtype (never cast for you)")
    ws = be.shape(w)
    if len(ws) != 2:
        raise XSeqLossError(f"weight has shape {fmt_shape(ws)}: it must be (C, H) with weight_layout='CH' or "
                            f"(H, C) with 'HC'")
    hpos = 1 if wl == "CH" else 0
    if ws[hpos] != H:
        other = "HC" if wl == "CH" else "CH"
        kind = "Flax / Keras Dense kernel" if other == "HC" else "torch nn.Linear weight"
        suggestion = (f" - did you mean weight_layout={other!r}? (a {kind} is {'(H, C)' if other == 'HC' else '(C, H)'})"
                      if ws[1 - hpos] == H else "")
        raise XSeqLossError(f"weight has shape {fmt_shape(ws, wl)} but hidden has H = {H} (shape "
                            f"{fmt_shape(hshape, hl)}): with weight_layout={wl!r} the weight is "
                            f"{'(C, H)' if wl == 'CH' else '(H, C)'}{suggestion}")
    C = ws[1 - hpos]
    if C == 0 and not CLASS_SLICE.get():  # a class-split worker may hold none
        raise XSeqLossError(f"weight has C = 0 classes (shape {fmt_shape(ws, wl)}): at least one class is "
                            f"required, valid range [1, inf)")
    b = None
    if bias is not None:
        b = side(be, bias, "bias", h)
        if be.kind(b) != "f" or be.dtype_name(b) != be.dtype_name(h):
            raise XSeqLossTypeError(f"bias has dtype {be.dtype_name(b)} but hidden has {be.dtype_name(h)}: hidden, "
                                    f"weight and bias share one floating dtype (never cast for you)")
        if tuple(be.shape(b)) != (C,):
            raise XSeqLossError(f"bias has shape {fmt_shape(be.shape(b))} but must be (C={C},) "
                                f"(weight {fmt_shape(ws, wl)})")
    shape = tuple(C if a == "H" else d for a, d in zip(hl, hshape))  # the logits it means
    tokens = 1
    for a, d in zip(hl, hshape):
        if a != "H" and d is not None:
            tokens *= d
    return LayerArrays(be, h, w, b, hl, wl, hl.replace("H", "C"), shape, int(C), tokens, chunk_size)


def with_layer(call: Call, lay: LayerArrays, plain: bool, temporaries: Any = 4) -> Call:
    """The call's plan with the layer's geometry: the chunk size asked for, or one whose float32
    logits take at most ``Backend.linear_chunk_bytes`` (twice that for a plain chunk whose
    gradient takes the logits' own buffer), divided by ``temporaries`` for a formula that keeps
    that many chunk-sized temporaries (an int, or a function of the call's engine)."""
    be, st = lay.be, call.st
    eng = engine.DEFAULT if call.tracing and be.name == "torch" else engine.current(be.name)
    if callable(temporaries):
        temporaries = temporaries(eng)
    chunk = lay.chunk_size
    if chunk is None:
        cap_bytes = be.linear_chunk_bytes
        if plain:  # a backend that forms the gradient in the logits' buffer holds one chunk, not two
            cap_bytes *= be.linear_plain_chunk_factor()
        cap = cap_bytes // (4 * max(lay.C, 1))
        if not plain:  # the general formula keeps a few chunk-sized temporaries
            cap //= temporaries
        chunk = max(1, min(cap, lay.tokens))
    call.st = make_plan(st.opts, st.C, st.soft, st.mark_nan, st.has_mask, st.has_lengths, st.has_weights,
                        st.has_cw, st.has_normalizer, limits=be.index_limits(),
                        engine=eng,
                        has_segments=st.has_segments, linear=LinearLayout(lay.hidden_layout.index("H"),
                                                                          lay.weight_layout, chunk),
                        store=not (call.tracing and be.name == "torch"), stats=st.stats)
    call.hidden_size = be.shape(lay.h)[lay.hidden_layout.index("H")]
    # jax.grad without jit: the hidden states are traced, the labels concrete (decisions.md 24)
    call.check_sides = bool(st.opts.validate and call.tracing and not any(
        be.tracing(a) for a in (*call.arrays[1:], call.ids, call.temp) if a is not None))
    return call


__all__ = ["LayerArrays", "layer_arrays", "with_layer", "WEIGHT_LAYOUTS"]
