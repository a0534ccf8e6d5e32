"""PyTorch's part of the fused output layer (``linear_cross_entropy``, core/linear.py).

The chunk loop's native pieces (``TorchChunks``): one chunk's logits at a time, in float32 (16-bit
inputs: the weight is read in float32 once per call), in one reused buffer; the gradient formed in
that buffer; d hidden written per chunk with ``mm(out=)``; d weight accumulated in float32 with
``addmm_`` (no C x H temporary). Two custom ops, so ``torch.compile(fullgraph=True)`` sees one
opaque node (no graph break, no chunk loop unrolled into the graph): the forward returns the losses
and the gradients it formed; the backward op matches them to the upstream gradient in place by the
upstream rule (core/backward.py: nothing, a rescale, or the chunks again).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from ...core import backward
from ...core.linear import ChunkLoop, loss_width, run_chunks
from ...plan.call_plan import CallPlan, LinearLayout, StatsPlan
from ...plan.options import Options

_BACKEND: Any = None  # the composed backend (its ops), bound by the package's __init__ (``bind``)


def bind(backend: Any) -> None:
    global _BACKEND
    _BACKEND = backend


class TorchChunks(ChunkLoop):
    def __init__(self, lay: Any, acc: Any, h2: Any, w: Any, b: Any, grads: bool, dh_dtype: Any = None,
                 width: int = 0) -> None:
        self.h2, self.w, self.b, self.acc, self.grads, self.width = h2, w, b, acc, grads, width
        self.dh_dtype = h2.dtype if dh_dtype is None else dh_dtype
        self.R, self.chunk, self.ch = h2.shape[0], lay.chunk, lay.weight_layout == "CH"
        self.wa = w if w.dtype == acc else w.to(acc)  # 16-bit: read once in float32 (logits in float32)
        self.ba = None if b is None else b.to(acc)
        self.C = w.shape[0] if self.ch else w.shape[1]

    def start(self) -> dict:
        st: dict = {"l": torch.empty((self.R, self.width) if self.width else (self.R,), dtype=self.acc,
                                     device=self.h2.device)}
        st["z"] = torch.empty((min(self.chunk, self.R), self.C), dtype=self.acc, device=self.h2.device)
        if self.grads:
            st["dh"] = torch.empty_like(self.h2, dtype=self.dh_dtype)
            st["dw"] = torch.zeros(self.w.shape, dtype=self.acc, device=self.w.device)  # float32 (Liger 512)
            st["db"] = None if self.b is None else torch.zeros(self.C, dtype=self.acc, device=self.w.device)
        return st

    def run(self, step: Any, state: Any) -> Any:
        for i in range(-(-self.R // self.chunk)):
            state = step(i, state)
        return state

    def _span(self, i: int) -> slice:
        return slice(i * self.chunk, min(self.R, (i + 1) * self.chunk))

    def rows(self, a: Any, i: int) -> Any:
        return None if a is None else a[self._span(i)]

    def hidden(self, state: Any, i: int) -> Any:
        hc = self.h2[self._span(i)]
        return hc if hc.dtype == self.acc else hc.to(self.acc)

    def logits(self, hc: Any, state: Any) -> Any:
        z = state["z"][:hc.shape[0]]
        torch.mm(hc, self.wa.t() if self.ch else self.wa, out=z)
        if self.ba is not None:
            z += self.ba
        return z

    def put_loss(self, state: Any, i: int, l: Any) -> Any:
        state["l"][self._span(i)] = l
        return state

    def put_dh(self, state: Any, i: int, g: Any) -> Any:
        dh, w = state["dh"], (self.wa if self.ch else self.wa.t())
        if dh.dtype == self.acc:
            torch.mm(g, w, out=dh[self._span(i)])
        else:
            dh[self._span(i)] = torch.mm(g, w)
        return state

    def add_dw(self, state: Any, i: int, g: Any, hc: Any) -> Any:
        if self.ch:
            state["dw"].addmm_(g.t(), hc)
        else:
            state["dw"].addmm_(hc.t(), g)
        return state

    def add_db(self, state: Any, g: Any) -> Any:
        if state["db"] is not None:
            state["db"] += g.sum(0)
        return state

    def finish(self, state: Any) -> tuple[Any, Any, Any, Any]:
        if not self.grads:
            return state["l"], None, None, None
        db = state["db"]
        return state["l"], state["dh"], state["dw"].to(self.w.dtype), None if db is None else db.to(self.b.dtype)


@functools.lru_cache(maxsize=256)
def row_plan(C: int, soft: bool, eps: float, z_loss: float, cap: float, has_cw: bool, stats: str) -> CallPlan:
    """The per-row plan from the primitives a custom op can carry (torch.compile bakes them into its
    graph): "NC" rows, the smoothing already in the uniform convention, the return_stats names."""
    o = Options("NC", (), "logits", eps, "uniform", z_loss, cap if cap > 0 else None, "none", "weights", "zero",
                None, False, False)
    sp = StatsPlan(tuple(stats.split(",")), 1.0, "", 0, True) if stats else None
    return CallPlan(o, C, soft, eps, False, False, False, False, has_cw, False, stats=sp)


def _plan_args(rp: CallPlan) -> tuple:
    o = rp.opts
    return (rp.C, rp.soft, float(rp.eps), float(o.z_loss), float(o.cap or 0.0), bool(rp.has_cw),
            "" if rp.stats is None else ",".join(rp.stats.outputs))


def _loop(args: tuple, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any, scale: Any,
          grads: bool) -> tuple[Any, Any, Any, Any]:
    *pargs, chunk, wl = args
    rp = row_plan(*pargs)
    acc = torch.float64 if h2.dtype == torch.float64 else torch.float32
    loop = TorchChunks(LinearLayout(1, wl, chunk), acc, h2, w, b, grads, width=loss_width(rp))
    l, dh, dw, db = run_chunks(_BACKEND, rp, loop, y, t, keep, cw, acc, scale if grads else None, grads)
    if not grads:
        return l, h2.new_empty(0), w.new_empty(0), w.new_empty(0)
    return l, dh, dw, (w.new_empty(0) if db is None else db)


@torch.library.custom_op("xseqloss::linear_ce", mutates_args=())
def _linear_ce(h2: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: Optional[torch.Tensor],
               t: Optional[torch.Tensor], keep: Optional[torch.Tensor], cw: Optional[torch.Tensor],
               scale: torch.Tensor, C: int, soft: bool, eps: float, z_loss: float, cap: float, has_cw: bool,
               stats: str, chunk: int, wl: str,
               grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _loop((C, soft, eps, z_loss, cap, has_cw, stats, chunk, wl), h2, w, b, y, t, keep, cw, scale, grads)


@_linear_ce.register_fake
def _(h2, w, b, y, t, keep, cw, scale, C, soft, eps, z_loss, cap, has_cw, stats, chunk, wl, grads):
    acc = torch.float64 if h2.dtype == torch.float64 else torch.float32
    cols = 1 + len(stats.split(",")) if stats else 0
    l = h2.new_empty((h2.shape[0], cols) if cols else (h2.shape[0],), dtype=acc)
    if not grads:
        return l, h2.new_empty(0), w.new_empty(0), w.new_empty(0)
    return l, torch.empty_like(h2), torch.empty_like(w), (w.new_empty(0) if b is None else torch.empty_like(b))


@torch.library.custom_op("xseqloss::linear_ce_match", mutates_args=("dh", "dw", "db"))
def _linear_ce_match(dl: torch.Tensor, formed: torch.Tensor, dh: torch.Tensor, dw: torch.Tensor, db: torch.Tensor,
                     h2: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: Optional[torch.Tensor],
                     t: Optional[torch.Tensor], keep: Optional[torch.Tensor], cw: Optional[torch.Tensor],
                     C: int, soft: bool, eps: float, z_loss: float, cap: float, has_cw: bool, stats: str, chunk: int,
                     wl: str) -> None:
    """Make the gradients formed for the per-token upstream ``formed`` those of ``dl``, in place
    (core/backward.py, uniform: d weight sums over the tokens, so only a common multiple scales)."""
    ops = _BACKEND
    if bool(backward.is_formed(ops, dl, formed, keep)):
        return  # loss.backward() of the reduced loss: the gradients are ready
    m = backward.upstream(ops, dl, formed, keep, per_row=False)
    if not bool(m.again):  # a scaled loss, GradScaler: every gradient scales alike
        for g in (dh, dw, db):
            if g.numel():
                g.mul_(m.factor.to(g.dtype))
        return
    args = (C, soft, eps, z_loss, cap, has_cw, stats, chunk, wl)
    _, dh2, dw2, db2 = _loop(args, h2, w, b, y, t, keep, cw, dl, True)  # a cotangent: the chunks again
    dh.copy_(dh2)
    dw.copy_(dw2)
    if db.numel():
        db.copy_(db2)


@_linear_ce_match.register_fake
def _(dl, formed, dh, dw, db, h2, w, b, y, t, keep, cw, C, soft, eps, z_loss, cap, has_cw, stats, chunk, wl):
    return None


def _setup(ctx: Any, inputs: Any, output: Any) -> None:
    # the gradients it returns are outputs no loss uses: without this autograd would hand the
    # backward a zeros_like of each (a d hidden and a d weight of zeros at the peak)
    ctx.set_materialize_grads(False)
    ctx.inputs = inputs
    ctx.grads = output[1:]
    ctx.formed = inputs[7]


def _backward(ctx: Any, dl: Any, *_: Any) -> Any:
    h2, w, b, y, t, keep, cw, scale, *args, grads = ctx.inputs
    if dl is None:  # no gradient reached the losses (gradcheck of another output, a detached use)
        dl = torch.zeros_like(scale) if scale.numel() else h2.new_zeros(h2.shape[0])
    elif dl.ndim == 2:  # return_stats: the losses are column 0, the metrics carry no gradient
        dl = dl[:, 0].contiguous()
    if ctx.grads is None:  # a second backward (retain_graph): the first handed its buffers out
        _, dh, dw, db = torch.ops.xseqloss.linear_ce(h2, w, b, y, t, keep, cw, dl, *args, True)
    else:
        dh, dw, db = ctx.grads
        torch.ops.xseqloss.linear_ce_match(dl, ctx.formed, dh, dw, db, h2, w, b, y, t, keep, cw, *args)
    # handed over, not kept: a gradient still referenced here would be copied by autograd's
    # accumulation into .grad (a second d weight and d hidden at the peak)
    ctx.grads = ctx.formed = None
    return (dh, dw, (db if b is not None else None)) + (None,) * 15


torch.library.register_autograd("xseqloss::linear_ce", _backward, setup_context=_setup)


class TorchLinear:
    def chunk_loop(self, rp: Any, lay: Any, acc: Any, h2: Any, w: Any, b: Any, grads: bool,
                   width: int = 0) -> TorchChunks:
        return TorchChunks(lay, acc, h2, w, b, grads, width=width)

    def linear_token_loss(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any, cw: Any,
                          acc: Any, scale_fn: Any, want_grad: bool) -> Any:
        needs = torch.is_grad_enabled() and (h2.requires_grad or w.requires_grad
                                             or (b is not None and b.requires_grad))
        with torch.no_grad():
            scale = scale_fn() if needs else h2.new_empty(0, dtype=acc)
        return torch.ops.xseqloss.linear_ce(h2, w, b, y, t, keep, cw, scale.detach(), *_plan_args(rp), lay.chunk,
                                            lay.weight_layout, needs)[0]

    def linear_value_and_grad(self, fn: Any, st: Any, h: Any, w: Any, b: Any, *arrays: Any) -> Any:
        with torch.enable_grad():
            leaves = [None if a is None else a.detach().requires_grad_(True) for a in (h, w, b)]
            out = fn(self, st, *leaves, *arrays)
            want = [a for a in leaves if a is not None]
            grads = torch.autograd.grad(out.sum(), want)
        g = iter(grads)
        return out.detach(), tuple(None if a is None else next(g) for a in leaves)
