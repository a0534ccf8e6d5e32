"""``linear_token_stats`` (API.md 11.4): token_stats of ``hidden @ weight^T + bias`` through the fused
layer's one chunk loop (core/linear.py ``run_kernel``), never holding the (tokens, C) logits.

The forward runs the loop once with the per-chunk kernel ``forward_kernel``: each chunk's logits go
to ``stats.stats_rows`` and its outputs, with what the backward needs (m, log s, Ē per token), are
packed as columns of one (tokens, width) array. The backward (the backend's custom gradient around
the loop) runs the loop again with ``backward_kernel``: each chunk's logits formed again, its
gradient from ``stats.stats_vjp`` under the cotangents (unlike the loss, the upstream gradient of
per-token outputs is not known in the forward), and d hidden, d weight, d bias accumulated by the
loop. On NumPy and PyTorch both kernels take the chunk a block of rows at a time (core/stats_chunks.py),
so each block stays in cache through the formula's passes.
"""

from __future__ import annotations

from typing import Any, Callable

from ..plan.call_plan import CallPlan
from . import stats as core_stats
from . import stats_chunks

_SAVED = 3  # m, log s, Ē


def columns(rp: CallPlan) -> dict:
    """The packed array's columns: name -> (first column, width)."""
    out, c = {}, 0
    for name in rp.stats.outputs:
        w = rp.stats.n_ids if name == "ids_log_prob" else 1
        out[name] = (c, w)
        c += w
    out["saved"] = (c, _SAVED)
    return out


def width(rp: CallPlan) -> int:
    c, w = columns(rp)["saved"]
    return c + w


def _temp(rp: CallPlan, tc: dict) -> Any:
    return rp.stats.temperature if rp.stats.temperature is not None else tc.get("temp")


def in_blocks(ops: Any, split: Any) -> bool:
    """Run a chunk's logits a block of rows at a time (core/stats_chunks.py): on the eager backends
    that write in place (``Backend.empty_rows``), where the fused layer's chunk (~64 MB) would leave
    the cache between the formula's passes; not under a class split (``split``: the call's
    class_parallel; each block would be one more round of collectives)."""
    return ops.empty_rows is not None and split is None


def chunk_temporaries(ops: Any, split: Any, kernel: str) -> int:
    """How many chunk-sized arrays a chunk holds (api/layer.py ``with_layer`` sizes chunks by it):
    the block-wise kernels keep the chunk's logits only (the gradient written over them), a
    compiled chunk kernel its logits and its gradient (``compile_chunk_kernel``; never under the
    engine's ``kernel`` "native"), the whole-chunk formula a few more."""
    if in_blocks(ops, split):
        return 1
    return 2 if ops.compile_chunk_kernel is not None and kernel != "native" else 4


def forward_kernel(ops: Any, rp: CallPlan, acc: Any) -> Callable[[Any, dict], tuple[Any, Any]]:
    blocks = in_blocks(ops, rp.class_parallel)

    def kernel(z: Any, tc: dict) -> tuple[Any, Any]:
        args = (z, tc.get("y"), tc.get("ids"), tc["keep"], _temp(rp, tc), acc)
        out, saved = stats_chunks.forward(ops, rp, *args) if blocks else core_stats.stats_rows(ops, rp, *args, k=1)
        cols = []
        for name in rp.stats.outputs:
            v = ops.cast(out[name], acc)
            cols.append(v if name == "ids_log_prob" else ops.expand(v, 1))
        cols += [ops.expand(s, 1) for s in saved]
        return ops.concat(cols, 1), None
    return kernel


def _chunk_cotangents(cols: dict, cts: Any) -> dict:
    """The differentiable outputs' cotangents of a chunk, from their packed columns."""
    ct = {}
    for name in core_stats.DIFFERENTIABLE:
        if name in cols:
            c, w = cols[name]
            ct[name] = cts[:, c:c + w] if name == "ids_log_prob" else cts[:, c]
    return ct


def backward_kernel(ops: Any, rp: CallPlan, acc: Any) -> Callable[[Any, dict], tuple[Any, Any]]:
    """``tc["packed"]``: the forward's packed rows; ``tc["cts"]``: the cotangents in the same columns
    (those of argmax, correct and the saved columns are ignored)."""
    cols = columns(rp)
    blocks = in_blocks(ops, rp.class_parallel)

    def kernel(z: Any, tc: dict) -> tuple[Any, Any]:
        packed = tc["packed"]
        c0 = cols["saved"][0]
        saved = tuple(packed[:, c0 + j] for j in range(_SAVED))
        args = (z, tc.get("y"), tc.get("ids"), tc["keep"], _temp(rp, tc), acc, saved, _chunk_cotangents(cols, tc["cts"]))
        if blocks:  # the gradient written over the chunk's logits, a block of rows at a time
            return packed[:, 0], stats_chunks.gradient(ops, rp, *args, z)
        return packed[:, 0], core_stats.stats_vjp(ops, rp, *args, k=1)
    return kernel


def vjp_kernel(ops: Any, rp: CallPlan, acc: Any) -> Callable[[Any, dict], tuple[Any, Any]]:
    """A chunk's forward and gradient at once (the analytic VJP of a backend without autodiff: no
    forward pass is kept, so the loop runs once, its logits formed once)."""
    cols = columns(rp)
    blocks = in_blocks(ops, rp.class_parallel)

    def kernel(z: Any, tc: dict) -> tuple[Any, Any]:
        y, ids, keep, temp = tc.get("y"), tc.get("ids"), tc["keep"], _temp(rp, tc)
        if blocks:  # each block's forward and gradient together, the gradient over the chunk's logits
            return z[:, 0], stats_chunks.gradient(ops, rp, z, y, ids, keep, temp, acc, None,
                                                  _chunk_cotangents(cols, tc["cts"]), z)
        _, saved = core_stats.stats_rows(ops, rp, z, y, ids, keep, temp, acc, k=1)
        g = core_stats.stats_vjp(ops, rp, z, y, ids, keep, temp, acc, saved, _chunk_cotangents(cols, tc["cts"]), k=1)
        return saved[0], g
    return kernel


def unpack(ops: Any, rp: CallPlan, packed: Any) -> dict:
    """The outputs of the packed (tokens, width) rows (argmax and correct back to their dtypes)."""
    out = {}
    for name, (c, w) in columns(rp).items():
        if name == "saved":
            continue
        v = packed[:, c:c + w] if name == "ids_log_prob" else packed[:, c]
        if name == "argmax":
            v = ops.as_index(v)
        elif name == "correct":
            v = v > 0.5
        out[name] = v
    return out


def linear_stats_core(ops: Any, st: CallPlan, h: Any, w: Any, b: Any, y: Any, mask: Any, lengths: Any, segs: Any,
                      ids: Any, temp: Any) -> dict:
    """token_stats of the fused layer's logits: the token side (core/stats.py ``token_side_rules``),
    the backend's differentiable chunk loop (``Backend.linear_token_stats``) over the flattened
    tokens, then the outputs in the targets' token shape with the NaN marks and ``counted``."""
    lay = st.linear
    acc = ops.acc_dtype(h)
    r = core_stats.token_side_rules(ops, st, h, y, mask, lengths, segs, ids, temp)
    like = r["like"]
    hr = ops.moveaxis(h, lay.h_axis, -1) if lay.h_axis != ops.ndim(h) - 1 else h
    h2 = ops.reshape_rows(hr)  # (tokens, H), in the token arrays' order
    flat = (lambda x: None if x is None else ops.flat(x))
    ids2 = None if r["ids"] is None else ops.reshape_rows(r["ids"])
    temp2 = r["temp"] if isinstance(r["temp"], float) or r["temp"] is None else flat(r["temp"])
    rp = st.row_plan
    if st.class_parallel is not None:
        packed = ops.linear_stats_class_parallel(rp, lay, h2, w, b, flat(r["y"]), ids2, flat(r["counted"]), temp2, acc)
    else:
        packed = ops.linear_token_stats(rp, lay, h2, w, b, flat(r["y"]), ids2, flat(r["counted"]), temp2, acc)
    out = unpack(ops, rp, packed)
    for name, v in out.items():
        if name == "ids_log_prob":
            out[name] = _reshape_ids(ops, v, like, rp.stats.n_ids)
        else:
            out[name] = ops.reshape_like(v, like)
    return core_stats.apply_marks(ops, out, r["bad"], r["counted"], like)


def _reshape_ids(ops: Any, v: Any, like: Any, k: int) -> Any:
    """(tokens, k) rows back to the targets' token shape plus the k axis."""
    cols = [ops.expand(ops.reshape_like(v[:, j], like), ops.ndim(like)) for j in range(k)]
    return cols[0] if k == 1 else ops.concat(cols, ops.ndim(like))


def _kernel(ops: Any, make: Callable, rp: CallPlan, acc: Any) -> Callable:
    """``make(ops, rp, acc)``, compiled as one kernel where the backend compiles chunk kernels."""
    return make(ops, rp, acc) if ops.compile_chunk_kernel is None else ops.compile_chunk_kernel(make, rp, acc)


def forward(ops: Any, rp: CallPlan, loop: Any, tokens: dict, acc: Any) -> Any:
    """The packed outputs (tokens, width): the loop once with the forward kernel."""
    from .linear import run_kernel
    return run_kernel(ops, loop, tokens, _kernel(ops, forward_kernel, rp, acc), False)[0]


def backward(ops: Any, rp: CallPlan, loop: Any, tokens: dict, packed: Any, cts: Any, acc: Any) -> tuple:
    """(d hidden, d weight, d bias) for the cotangents of the packed outputs: the loop again."""
    from .linear import run_kernel
    _, dh, dw, db = run_kernel(ops, loop, dict(tokens, packed=packed, cts=cts), _kernel(ops, backward_kernel, rp, acc),
                               True)
    return dh, dw, db


def token_arrays(y: Any, ids: Any, keep: Any, temp: Any) -> dict:
    """The token arrays the kernels slice per chunk (a Python float temperature is the plan's)."""
    out = dict(y=y, ids=ids, keep=keep)
    if temp is not None and not isinstance(temp, float):
        out["temp"] = temp
    return out


def pack_cotangents(ops: Any, rp: CallPlan, cts: dict, like: Any, acc: Any) -> Any:
    """Cotangents by output name (token-shaped; ids_log_prob with its k axis) as the packed columns."""
    cols = []
    for name, (c, w) in columns(rp).items():
        v = None if name == "saved" else cts.get(name)
        if v is None or name not in core_stats.DIFFERENTIABLE:
            cols.append(None)
            continue
        v = ops.cast(v, acc)
        cols.append(ops.reshape_rows(v) if name == "ids_log_prob" else ops.expand(ops.flat(v), 1))
    rows = ops.expand(ops.full_tokens(ops.flat(like), 0.0, acc), 1)
    full = []
    for (name, (c, w)), col in zip(columns(rp).items(), cols):
        full.append(col if col is not None else ops.concat([rows] * w, 1))
    return ops.concat(full, 1)


def linear_stats_vjp_core(ops: Any, st: CallPlan, h: Any, w: Any, b: Any, y: Any, mask: Any, lengths: Any,
                          segs: Any, ids: Any, temp: Any, cts: dict) -> tuple:
    """(d hidden, d weight, d bias) of sum over outputs of sum(cotangent * output), analytically
    (linear_token_stats_vjp on a backend without autodiff): the loop once, each chunk's forward and
    gradient together (``vjp_kernel``)."""
    lay = st.linear
    acc = ops.acc_dtype(h)
    r = core_stats.token_side_rules(ops, st, h, y, mask, lengths, segs, ids, temp)
    if r["bad"] is not None:
        nan = ops.where(r["bad"], float("nan"), 1.0)
        cts = {n: (c * ops.expand(nan, ops.ndim(c) - 1) if n == "ids_log_prob" else c * nan) for n, c in cts.items()}
    hr = ops.moveaxis(h, lay.h_axis, -1) if lay.h_axis != ops.ndim(h) - 1 else h
    h2 = ops.reshape_rows(hr)
    flat = (lambda x: None if x is None else ops.flat(x))
    ids2 = None if r["ids"] is None else ops.reshape_rows(r["ids"])
    temp2 = r["temp"] if isinstance(r["temp"], float) or r["temp"] is None else flat(r["temp"])
    rp = st.row_plan
    tokens = token_arrays(flat(r["y"]), ids2, flat(r["counted"]), temp2)
    ct = pack_cotangents(ops, rp, cts, r["like"], acc)
    from .linear import run_kernel
    _, dh2, dw, db = run_kernel(ops, ops.chunk_loop(rp, lay, acc, h2, w, b, True), dict(tokens, cts=ct),
                                vjp_kernel(ops, rp, acc), True)
    dh = ops.reshape_like(dh2, hr)
    if lay.h_axis != ops.ndim(h) - 1:
        dh = ops.moveaxis(dh, -1, lay.h_axis)
    return dh, dw, db
