"""The backend contract: what a backend must implement, and the optional kernels it may offer.

The core (``xseqloss/core``) writes every rule once over the ops below; a backend (one package per
framework under ``xseqloss/backends``) contributes only what must be native. Each backend's class
derives from ``Backend`` and is composed in its package's ``__init__`` from that package's parts.

* **Required ops**: the array ops of ``ARRAY_OPS`` (one line each) and the methods marked
  required below (``NotImplementedError`` here); ``tests/test_backend_contract.py`` checks that
  every backend defines each of them itself (none is inherited from this class).
* **Optional hooks** are declared here with their default (``None``, ``False`` or a method that
  says "not on this backend"); the core tests ``hook is None``, never ``getattr``. A backend sets
  a hook to use its own kernel; what each hook must satisfy is written beside it.

New backend: implement the required ops (NumPy's backend is the smallest complete example), run
the suite (``pytest tests conformance``) with it in ``_dispatch.BACKENDS``, then add hooks where a
measurement says they pay. docs/architecture.md has the walk-through.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from .._errors import XSeqLossTypeError

__all__ = ["Backend", "ARRAY_OPS", "REQUIRED", "HOOKS"]

# The array ops the core uses, each a method of every backend (arrays are the framework's own;
# ``acc`` an accumulation dtype: float32, or float64 for float64 inputs; ``k`` a class axis;
# "token-shaped": the targets' shape, the logits' without the class axis).
ARRAY_OPS = {
    # identity and inspection
    "version": "() -> the framework's version string",
    "devices": "() -> the devices it reaches, as strings",
    "convert": "(x, argument, like=None) -> a NumPy array or Python value as this framework's array on like's device",
    "to_device": "(x, like) -> this framework's array x on like's device (or sharding)",
    "kind": '(x) -> "f" floating, "i" signed, "u" unsigned, "b" bool, another letter otherwise',
    "dtype_name": "(x) -> the dtype's name", "shape": "(x) -> the shape as a tuple (None: unknown at trace time)",
    "tracing": "(x) -> is x traced (jax.jit, tf.function, torch.compile): no value can be read",
    "index_dtype": "(y) -> labels as the index dtype: an integer cast, never a float one; unsigned values past "
                   "its range saturate at its maximum (never wrap onto an ignore value)",
    "to_numpy": "(x) -> a NumPy array (a host copy)",
    # dtypes and elementwise
    "acc_dtype": "(z) -> the accumulation dtype for z", "wide_dtype": "() -> the widest float (JAX without x64: float32)",
    "dtype": "(x) -> x's dtype", "cast": "(x, dtype) -> x in dtype",
    "where": "(c, a, b)", "expand": "(x, axis) -> a new axis of size 1", "exp": "(x)", "log": "(x)", "tanh": "(x)",
    "abs": "(x)", "isfinite": "(x)", "isfinite_any_dtype": "(x) -> isfinite for any numeric dtype (integers: true)",
    "nonzero": "(m) -> a mask as bool", "maximum": "(x, v)", "zeros_like": "(x)",
    "stop_gradient": "(x) -> x without gradient",
    # reductions (axis: an int, a tuple, or None for all)
    "sum": "(x, axis)", "max": "(x, axis)", "min": "(x, axis)", "any": "(x, axis)", "all": "(x, axis)",
    "any_true": "(x) -> host bool: is any element true (a host synchronisation)",
    "count": "(flags, axis) -> the number of true flags, as an integer array",
    # indexing and shapes
    "stack": "(xs)", "take": "(vec, idx) -> vec[idx]",
    "take_class": "(x, y, k) -> x at class y along axis k (y in range)",
    "add_class": "(g, y, vals, k) -> g plus vals at class y along axis k (may write into g: pass a fresh one)",
    "reshape_class": "(w, k, ndim) -> a (C,) vector shaped to broadcast along axis k of an ndim array",
    "full_tokens": "(like, value, dtype)", "true_like": "(like)",
    "drop_class": "(z, k) -> an array of z's shape without axis k (for shapes and devices only)",
    "dim": "(x, axis) -> an axis' size (an int, or a scalar tensor when unknown at trace time)",
    "ndim": "(x)", "size": "(x) -> the number of elements as an integer array",
    "size_of": "(x) -> the number of elements as a Python int where known",
    "arange": "(n, like) -> 0..n-1 in like's integer dtype (the default index dtype for a floating like)",
    "moveaxis": "(x, src, dst)", "permute": "(x, perm)", "concat": "(xs, axis)", "full_like": "(x, value)",
    "cumsum": "(x, axis)", "gather_along": "(x, idx, axis)", "flat": "(x) -> 1-D",
    "segment_sum": "(v, j) -> (N, T) sums of v by index j along T: out[n, i] = sum of v[n, t] with j[n, t] == i",
    "scatter": "(v, idx, size) -> a zero vector of size with v at idx",
    "reshape_like": "(x, like)", "reshape_rows": "(x) -> (-1, last axis) rows",
    "pad_stack": "(items, T, fill) -> per-sequence arrays (length, ...) as one (N, T, ...), fill past each length",
    "zeros_shape": "(shape, like)", "pick_step": "(h, idx) -> h[n, idx[n]] for (N, T, H) h",
    "argmax": "(x, k) -> the index of the largest value along k, the lowest on ties, in the index dtype",
    "as_index": "(x) -> an array of whole numbers (a float array) in the index dtype",
}


def _required(fn: Callable) -> Callable:
    fn.__xseqloss_required__ = True  # type: ignore[attr-defined]
    return fn


class Backend:
    """The ops the core uses. Arrays are the framework's own; ``acc`` is an accumulation dtype
    (float32, or float64 for float64 inputs); ``k`` a class axis; "token-shaped" means the targets'
    shape (the logits' shape minus the class axis)."""

    name: ClassVar[str] = ""             # "numpy", "torch", "tensorflow", "jax"
    type_name: ClassVar[str] = ""        # "a torch.Tensor" (in messages)

    def index_limits(self) -> tuple[int, int] | None:
        """The range of the index dtype when narrower than int64 (JAX without x64), else None."""
        return None

    def host_view(self, x: Any) -> Any:
        """``x`` as a NumPy array without a copy, or None."""
        return None

    host_probe: ClassVar[bool] = False
    """True: the softmax-input probe reads a few rows on the host (eager NumPy, PyTorch); False:
    it rides in the core's program (JAX, TensorFlow)."""

    def check_inplace(self, z: Any) -> None:
        """``inplace_backward=True`` is possible on these logits (PyTorch); elsewhere never asked."""

    def empty_cache(self) -> None:
        """Release the backend's reusable buffers (PyTorch's CPU gradient buffer); none elsewhere."""

    def raise_at_trace_time(self, kind: str, message: str) -> None:
        """PyTorch: raise an error of the catalogue while torch.compile traces (api/compiled.py)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- running the core
    @_required
    def run(self, fn: Callable, st: Any, *arrays: Any) -> Any:
        """``fn(self, st, *arrays)``: eagerly, or as one cached compiled program per plan."""
        raise NotImplementedError

    @_required
    def value_and_grad(self, fn: Callable, st: Any, z: Any, *arrays: Any) -> tuple[Any, Any]:
        """``fn``'s value and the gradient of its sum with respect to ``z``."""
        raise NotImplementedError

    value_and_grad_flagged: Any = None
    """Optional (JAX): ``(fn, st, z, *arrays) -> (value, grad, flags)`` for ``fn`` returning (value,
    flags), in one program: the value checks ride in the program that computes the gradient."""

    # ----------------------------------------------------------------- the plain kernel
    @_required
    def plain_ce(self, z: Any, y: Any, keep: Any, k: int, acc: Any, scale: Any = None,
                 out: Any = None) -> tuple[Any, Any]:
        """Plain cross-entropy along the class axis k, one contract on every backend
        (``tests/test_backend_contract.py`` checks each against the float64 reference):

        * returns ``(l, g)``: l = lse(z) - z[y] per token in ``acc``, formed in the max-shifted
          frame (exact for float32 logits near 1e4); a row whose max is -inf gives lse = -inf;
        * with ``scale`` (token-shaped, ``acc``) also g = (softmax(z) - onehot(y)) * scale in z's
          dtype, formed in ``acc`` (the true-class term in float32 before any 16-bit cast);
          without it g is None. ``out``: a buffer for g the backend may write into (``z`` itself:
          the gradient in the logits' own storage), or None;
        * y: token-shaped labels already clamped into [0, C); rows where ``keep`` (token-shaped
          bool, or None for all) is false give exactly 0 loss and exactly 0 gradient whatever
          their logits hold (NaN, +-inf);
        * no autodiff through it: the gradient is the explicit g.
        """
        raise NotImplementedError

    @_required
    def nll(self, z: Any, y: Any, keep: Any, k: int, acc: Any, st: Any = None) -> Any:
        """lse(z) - z[y] per token, differentiable by the framework's autodiff (the plain
        per-token loss of ``token_loss`` when it needs no explicit gradient); the same contract
        as ``plain_ce``'s l, and its gradient exactly 0 on rows where ``keep`` is false."""
        raise NotImplementedError

    @_required
    def token_stats_rows(self, st: Any, z: Any, y: Any, ids: Any, keep: Any, temp: Any, acc: Any) -> dict:
        """The per-token outputs of ``core.stats.stats_rows`` (a dict by name), differentiable for
        the logits by the framework's autodiff through a custom gradient whose backward is
        ``core.stats.stats_vjp`` (NumPy: the forward only; ``token_stats_vjp`` is analytic)."""
        raise NotImplementedError

    @_required
    def stats_vjp(self, fwd: Callable, vjp: Callable, st: Any, arrays: tuple, cts: dict) -> Any:
        """d logits of sum over outputs of sum(cts[name] * output) for ``fwd`` (core.stats.compute_stats)
        over ``arrays`` (logits first): the framework's autodiff, or ``vjp`` (compute_stats_vjp,
        analytic) on a backend without one."""
        raise NotImplementedError

    # ----------------------------------------------------------------- optional kernel hooks
    default_token_loss: Any = None
    """``(st, z, y, want_grad) -> (l, n, g) | None``, eager only: the default call (index targets,
    at most one ignore value, "none", "sum" or "mean") by the backend's leanest kernel: ``n`` the
    number of counted tokens as a Python int, ``l`` the losses reduced as
    ``reduction.default_native(st, n)`` says ("none", "sum", or the mean over the n counted
    tokens), and with ``want_grad`` (``value_and_grad`` of a backend without autodiff) ``g``,
    d result / d logits with the coefficient ``reduction.default_coef`` (a backend that cannot
    give it returns None then); None where it does not apply or a label is out of range (then the
    general path runs and raises or marks NaN). The empty mean is the core's (``reduction.default``)."""

    fused_token_loss: Any = None
    """``(st, z, y, t, keep, cw, acc, expected_dl, collect) -> l | None``: per-token losses whose gradient
    the backend forms during the forward pass for the upstream ``expected_dl()`` and matches to
    the real one with ``core.backward.upstream`` (PyTorch's chunked function, TensorFlow's XLA
    kernel); None: the core's generic formula under the framework's autodiff. ``collect``: a dict
    to fill with a loss's return_stats from the same pass (token_loss's ``collect``), or None."""

    row_kernel: Any = None
    """``(rp, z, y, t, keep, cw, acc, scale) -> (l, g) | None``: a kernel for (R, C) rows of logits
    with classes last that covers the per-row plan ``rp`` (PyTorch's Triton kernel): the losses,
    and with ``scale`` the gradient times scale written into z; None where it does not apply."""

    fused_value_and_grad: Any = None
    """``(st, z, y, t, keep, cw, acc, cotangent) -> (l, grad) | (None, None)``: per-token losses
    and the scaled analytic gradient for a backend without autodiff (NumPy)."""

    empty_rows: Any = None
    """``(shape, dtype, like) -> an uninitialised array`` on like's device, set by the eager backends
    whose arrays the core may write in place (NumPy, PyTorch): the fused layer's token_stats
    kernels then run a chunk's logits a block of rows at a time (core/stats_chunks.py), each block
    in cache through its passes, the gradient written back into the chunk's own logits buffer."""

    compile_chunk_kernel: Any = None
    """``(make, rp, acc) -> kernel``: the fused layer's token_stats chunk kernel ``make(ops, rp,
    acc)`` (core/linear_stats.py) compiled as one program (TensorFlow: by XLA, outside the caller's
    XLA), its passes over the chunk's logits fused: a chunk holds its logits and its gradient,
    no more chunk-sized temporaries (decision 113). Never compiled under the engine's kernel
    "native", whose chunks are sized for the whole-chunk formula."""

    fused_class_parallel: ClassVar[bool] = False
    """``fused_token_loss`` pairs its collectives across workers (its chunks are sized by the
    global C), so it may run with classes split across workers."""

    # ----------------------------------------------------------------- the fused output layer
    linear_chunk_bytes: ClassVar[int] = 64 << 20
    """One chunk's float32 logits take at most this by default (API.md 8)."""

    def linear_plain_chunk_factor(self) -> int:
        """How many times ``linear_chunk_bytes`` a plain chunk may take: 2 where its gradient is
        formed in the logits' own buffer (one chunk buffer instead of two at the peak)."""
        return 1

    @_required
    def chunk_loop(self, rp: Any, lay: Any, acc: Any, h2: Any, w: Any, b: Any, grads: bool, width: int = 0) -> Any:
        """The fused layer's native loop and buffers for ``core.linear.run_chunks`` (a
        ``core.linear.ChunkLoop``): a Python loop with in-place accumulation (NumPy, PyTorch), a
        ``lax.scan`` (JAX), a ``tf.while_loop`` (TensorFlow)."""
        raise NotImplementedError

    @_required
    def linear_token_loss(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any,
                          cw: Any, acc: Any, scale_fn: Callable, want_grad: bool) -> Any:
        """The fused layer's per-token losses, differentiable for hidden, weight and bias by the
        framework's autodiff (a custom op / vjp / gradient around ``core.linear.run_chunks``);
        with ``want_grad`` (NumPy) ``(l, (dh, dw, db))`` for the cotangent ``scale_fn()``."""
        raise NotImplementedError

    @_required
    def linear_value_and_grad(self, fn: Callable, st: Any, h: Any, w: Any, b: Any, *arrays: Any) -> Any:
        """``fn``'s value and the gradients of its sum for (hidden, weight, bias or None)."""
        raise NotImplementedError

    @_required
    def linear_token_stats(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any,
                           temp: Any, acc: Any) -> Any:
        """The fused layer's token_stats as packed (tokens, width) rows (core/linear_stats.py),
        differentiable for hidden, weight and bias by the framework's autodiff: a custom gradient
        whose backward runs the chunk loop again under the cotangents (NumPy: the forward only)."""
        raise NotImplementedError

    @_required
    def linear_stats_vjp(self, fwd: Callable, vjp: Callable, st: Any, arrays: tuple, cts: dict) -> Any:
        """(d hidden, d weight, d bias or None) of sum over outputs of sum(cts[name] * output) for
        ``fwd`` (core/linear_stats.linear_stats_core): the framework's autodiff, or ``vjp``
        (analytic) on a backend without one."""
        raise NotImplementedError

    # ----------------------------------------------------------------- many workers (API.md 9)
    def reducer(self, split: Any) -> Any:
        """The collectives over the workers of ``split`` (a ``plan.split.Reducer``)."""
        raise XSeqLossTypeError(f"class_parallel is for PyTorch and JAX: backend {self.name!r} has no tensor "
                                f"parallelism")

    def check_split_handle(self, handle: Any) -> None:
        """``handle`` is this backend's kind of class_parallel value, usable here."""
        raise XSeqLossTypeError(f"class_parallel is for PyTorch and JAX: backend {self.name!r} has no tensor "
                                f"parallelism")

    def gather_ints(self, handle: Any, ints: list, like: Any, err: BaseException | None, extra: Any = None
                    ) -> tuple[list, int]:
        """(every worker's ``ints`` in rank order, this worker's rank): one small all_gather.
        ``err``: this worker's own failure, raised instead of any error of the group itself.
        ``extra``: a 1-d int64 array appended to ``ints`` where it lies (``value_checksums``), so
        that no value is read back before the gather."""
        raise NotImplementedError

    def value_checksums(self, arrays: tuple) -> Any:
        """A 1-d int64 array of checksums, one per array of ``arrays`` (0 for None): the
        sum of its values' bits times position weights, wrapping, so exact and the same on every
        worker that holds the same values (the class split's agreement, _class_parallel.py)."""
        raise NotImplementedError

    def axis_size(self, handle: Any) -> int:
        """The number of workers along a mesh axis (JAX, inside shard_map / pmap)."""
        raise NotImplementedError

    def is_dtensor(self, x: Any) -> bool:
        return False

    def from_dtensor(self, logits: Any, kw: dict, class_axis: int, names: tuple) -> tuple[Any, dict]:
        raise NotImplementedError

    def linear_class_parallel(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, t: Any, keep: Any,
                              cw: Any, acc: Any) -> Any:
        """The fused layer with the weight sharded along C (its chunks' collectives paired across
        the workers, d hidden summed over them)."""
        raise XSeqLossTypeError(f"class_parallel is for PyTorch and JAX: backend {self.name!r} has no tensor "
                                f"parallelism")

    def linear_stats_class_parallel(self, rp: Any, lay: Any, h2: Any, w: Any, b: Any, y: Any, ids: Any, keep: Any,
                                    temp: Any, acc: Any) -> Any:
        """``linear_token_stats`` with the weight sharded along C (d hidden summed over the workers)."""
        raise XSeqLossTypeError(f"class_parallel is for PyTorch and JAX: backend {self.name!r} has no tensor "
                                f"parallelism")

    def sum_over_workers(self, fn: str, local: Callable, targets: Any, group: Any, axis_name: Any,
                         validate: bool) -> Any:
        """``local()`` (a count) summed over the workers with one scalar all-reduce; a failed local
        check on one worker is an error on every worker, never a hang (API.md 9.1)."""
        return local()

    def worker_count(self, group: Any, axis_name: Any) -> Any:
        """How many workers the gradients are averaged over (1 for one process)."""
        return 1

    def check_workers(self, fn: str, group: Any) -> None:
        """The collective named by ``group`` can run here (PyTorch: torch.distributed initialised)."""

    def workers_ready(self) -> bool:
        """Whether there are other workers to reach (PyTorch: torch.distributed initialised). Where
        there are none, one process holds the whole batch (Keras's ``normalizer="global"``)."""
        return True

    # ----------------------------------------------------------------- ragged types (API.md 7.1)
    def ragged_rows(self, kind: str, logits: Any, targets: Any, *, layout: str, lengths: Any, sides: dict,
                    reduction: str) -> Any:
        """A framework's own ragged logits (PyTorch PackedSequence / nested, TensorFlow
        RaggedTensor) as (R, C) rows of the padded batch (a ``core.ragged.Converted``)."""
        raise NotImplementedError

    def ragged_stand_in(self, kind: str, targets: Any) -> Any:
        """One-class stand-in logits with the ragged structure of ``targets`` (token counts)."""
        raise NotImplementedError

    def padded_hidden(self, hidden: Any, scores: Any, lengths: Any) -> tuple[Any, Any, Any]:
        """``pool``'s ragged hidden states (a PackedSequence) as (padded, scores, lengths)."""
        raise NotImplementedError


def _names(pred: Callable[[str, Any], bool]) -> tuple[str, ...]:
    return tuple(sorted(n for n, v in vars(Backend).items() if pred(n, v)))


REQUIRED = tuple(ARRAY_OPS) + _names(lambda n, v: getattr(v, "__xseqloss_required__", False))
HOOKS = ("compile_chunk_kernel", "default_token_loss", "empty_rows", "fused_token_loss", "fused_value_and_grad",
         "row_kernel", "value_and_grad_flagged")
