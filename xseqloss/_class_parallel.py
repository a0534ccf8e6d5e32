"""Classes split across workers (vocabulary / tensor parallel, API.md 9.2): ``class_parallel``.

Each worker holds a contiguous slice of the class axis, in rank order, of any size, and the same
global targets. The loss is the single-process loss over the global C: the per-token formula of
``core/token_loss.py`` is unchanged, and its class sums (the max, sum(exp), the target logit and
class weight, the smoothing sum, sum(q) and q . x) are this worker's partial sums combined over the
workers. Per call that is one all-reduce (max) of a token-sized vector and one all-reduce (sum) of
a few stacked token-sized vectors: O(tokens) bytes, never O(tokens x C). Every worker gets the
same loss; its gradient is its slice of the unsharded gradient, because the sum's backward is the
identity (each worker's upstream gradient of the replicated sums is already the full one).

* PyTorch: ``class_parallel=<ProcessGroup>`` (``torch.distributed.group.WORLD`` for the default
  group), eager. Before the loss one small ``all_gather`` (25 integers per rank) exchanges each
  worker's slice size, a checksum of its options and targets' shape, the fused layer's hidden
  size and a checksum of each replicated array's values (targets, mask, weights, ...), so the
  class offsets are known and workers that disagree get an error on every rank, never a hang; with
  ``validate=True`` one more small ``all_gather`` of the value-check flags makes a bad value on one
  worker (a negative class weight in its slice) an error on every worker.
* JAX: ``class_parallel="<axis name>"`` (or a tuple of names) inside ``shard_map`` / ``pmap``:
  ``jax.lax.pmax`` and ``jax.lax.psum``; the slice is ``axis_index * local C``. Under plain
  ``jax.jit`` with logits sharded along C by a ``NamedSharding`` no option is needed: the loss is
  the ordinary one and XLA's partitioner splits its class reductions the same way.
* TensorFlow and NumPy: an error (tf.distribute has no tensor parallelism; NumPy has one process).

This module is the orchestration, framework-neutral: which engine a ``class_parallel`` value names,
what the workers must agree on (a checksum of the options and the targets' shape, the values of
the replicated arrays, the hidden size), and what a
disagreement or a failed check on any worker means. The collectives themselves are the backend's
(``Backend.gather_ints``, ``Backend.axis_size``, ``Backend.reducer``, ``Backend.from_dtensor``:
backends/torch/class_parallel.py and backends/jax/class_parallel.py).
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Any, Callable

from . import _dispatch
from ._errors import XSeqLossError, XSeqLossTypeError
from .api.prepare import CLASS_SLICE
from .api.validate import check_concrete_sides, raise_value_error
from .core.checks import value_flags
from .core.sides import framework_of
from .plan.split import Split, with_split

__all__ = ["prepare", "check", "backend_name", "unwrap_dtensor"]


def engine_of(class_parallel: Any, backend_name: str | None) -> str:
    """"torch" or "jax" from the option's type, checked against the arrays' backend (a torch
    ProcessGroup is checked by the torch backend itself)."""
    jax_axis = isinstance(class_parallel, str) or (isinstance(class_parallel, tuple) and class_parallel
                                                   and all(isinstance(a, str) for a in class_parallel))
    if backend_name in ("tensorflow", "numpy"):
        raise XSeqLossTypeError(f"class_parallel is for PyTorch and JAX: backend {backend_name!r} has no "
                                f"tensor parallelism (tf.distribute splits data only; NumPy is one process)")
    engine = "jax" if jax_axis else "torch"
    if backend_name is not None and backend_name != engine:
        raise XSeqLossTypeError(f"class_parallel={class_parallel!r} is a {engine} option but the arrays are "
                                f"{backend_name}: a torch ProcessGroup for torch tensors, a mesh axis name for JAX")
    return engine


# the replicated arrays whose values the workers must agree on (soft targets and class weights
# are each worker's slice: they differ), checksummed in the split's all_gather after 16 integers
VALUES = ("targets", "mask", "lengths", "weights", "normalizer", "segment_ids", "rows", "ids", "temperature")
META = 16
check_values_agree = True  # internal: benchmarks/class_parallel_bench.py turns it off to time the checksums


def _values(call: Any) -> tuple:
    return (None if call.st.soft else call.y, call.mask, call.lengths, call.weights, call.normalizer, call.segs,
            call.rows, call.ids, call.temp)


def _meta(call: Any, num_classes: Any) -> list[int]:
    """This worker's slice size, and a checksum of everything the workers must agree on."""
    st = call.st
    tok = tuple(int(d) for d in call.tok_shape)
    lin = None if st.linear is None else (st.linear.h_axis, st.linear.weight_layout)
    facts = (st.opts, st.soft, st.has_mask, st.has_lengths, st.has_weights, st.has_cw, st.has_normalizer,
             st.has_segments, st.rows, st.mark_nan, num_classes, tok,
             None if call.z is None else call.be.dtype_name(call.z), lin, st.stats)
    crc = zlib.crc32(repr(facts).encode()) & 0x7FFFFFFF
    dims = list(tok[:8]) + [-1] * (8 - min(len(tok), 8))
    H = -1 if call.hidden_size is None else int(call.hidden_size)
    return [0, int(call.shape[st.opts.k]), crc, len(tok), *dims, H, 0, 0, 0]


def _agreed_split(be: Any, handle: Any, call: Any, err: BaseException | None, num_classes: Any,
                  like: Any) -> Split:
    """One all_gather of 16 integers and a checksum of each replicated array per rank (torch):
    slice sizes, agreement, errors on every rank."""
    if call is None:
        meta, sums = [1] + [0] * (META + len(VALUES) - 1), None
    elif check_values_agree:
        meta, sums = _meta(call, num_classes), be.value_checksums(_values(call))
    else:
        meta, sums = _meta(call, num_classes) + [0] * len(VALUES), None
    rows, rank = be.gather_ints(handle, meta, like, err, sums)
    failed = [r for r, m in enumerate(rows) if m[0]]
    if err is not None:
        raise err
    if failed:
        raise XSeqLossError(f"class_parallel: rank(s) {failed} of the group failed their own checks of this call "
                            f"(each raises its error); nothing was computed on rank {rank}")
    for r, m in enumerate(rows):
        if m[2] != rows[0][2]:
            t0, tr = tuple(rows[0][4:4 + rows[0][3]]), tuple(m[4:4 + m[3]])
            what = (f"the targets' token shapes differ: {t0} on rank 0, {tr} on rank {r}" if t0 != tr else
                    f"the options or the side arrays given (layout, ignore_index, smoothing, reduction, "
                    f"validate, mask / weights / class_weights present, dtype, ...) differ between rank 0 "
                    f"and rank {r}")
            raise XSeqLossError(f"class_parallel: the workers must make the same call with their own slice of "
                                f"the class axis, but {what}")
    _agree_on_values(rows)
    sizes = tuple(m[1] for m in rows)
    C = sum(sizes)
    if C == 0:
        raise XSeqLossError(f"class_parallel: the workers' slices hold C = 0 classes together (slices {list(sizes)} "
                            f"in rank order): at least one class is required, valid range [1, inf); a worker may "
                            f"hold none")
    if num_classes is not None and num_classes != C:
        raise XSeqLossError(f"class_parallel: the workers' slices hold C = {C} classes together "
                            f"(slices {list(sizes)} in rank order) but num_classes={num_classes}")
    return Split("torch", handle, sizes[rank], C, lo=sum(sizes[:rank]), sizes=sizes, rank=rank)


def _agree_on_values(rows: list) -> None:
    """The hidden size and the replicated arrays' checksums: the same on every rank, or an error
    (the same on every rank) naming what differs and where."""
    Hs = [m[12] for m in rows]
    if any(H != Hs[0] for H in Hs):
        raise XSeqLossError(f"class_parallel: the workers must make the same call with their own slice of the "
                            f"class axis, but hidden's size H differs: H = {Hs} in rank order (the fused layer's "
                            f"hidden states are replicated; each weight slice is (C_local, H))")
    differ = []
    for i, name in enumerate(VALUES):
        ranks = [r for r, m in enumerate(rows) if m[META + i] != rows[0][META + i]]
        if ranks:
            differ.append(f"{name} on rank(s) {ranks}")
    if differ:
        raise XSeqLossError(f"class_parallel: the workers must make the same call with their own slice of the "
                            f"class axis and the same values of every replicated argument, but these differ from "
                            f"rank 0's: {'; '.join(differ)} (a checksum of each is compared; soft targets and "
                            f"class_weights are each worker's slice and are not compared)")


def _axis_split(be: Any, axis: Any, call: Any, num_classes: Any) -> Split:
    """JAX: equal slices along a mesh axis; a smaller num_classes marks vocabulary padding."""
    n = be.axis_size(axis)
    local = int(call.shape[call.st.opts.k])
    width = int(n) * local
    if num_classes is not None and not 1 <= num_classes <= width:
        raise XSeqLossError(f"class_parallel: {int(n)} devices along {axis!r} with {local} classes each hold "
                            f"C = {width} classes but num_classes={num_classes}; valid range [1, {width}] "
                            f"(a smaller num_classes marks the last columns as vocabulary padding)")
    if num_classes is not None and num_classes < width:  # a vocabulary padded to divide evenly
        return Split("jax", axis, local, int(num_classes), padded=True)
    return Split("jax", axis, local, width)


def prepare(run_local: Callable[[], Any], class_parallel: Any, num_classes: Any, backend: str | None,
            like: Any) -> Any:
    """A class-parallel call's preparation: ``run_local()`` (the local static checks, with the
    local C; returns the call, or a tuple starting with it), then the split (torch: one small
    all_gather, every rank raising if any rank failed), then the plan over the global C."""
    engine = engine_of(class_parallel, backend)
    be = _dispatch.load(engine)
    be.check_split_handle(class_parallel)
    out = err = None
    token = CLASS_SLICE.set(engine == "torch")  # a torch worker may hold 0 classes (JAX slices are even)
    try:
        out = run_local()
    except (XSeqLossError, XSeqLossTypeError) as exc:
        if engine != "torch":
            raise
        err = exc
    finally:
        CLASS_SLICE.reset(token)
    call = out[0] if isinstance(out, tuple) else out
    if engine == "torch":
        split = _agreed_split(be, class_parallel, call, err, num_classes, like)
    else:
        split = _axis_split(be, class_parallel, call, num_classes)
    if num_classes is not None:
        call.st = replace(call.st, opts=replace(call.st.opts, num_classes=num_classes))
    call.st = with_split(call.st, split)
    return out


def backend_name(first: Any, backend: Any) -> str | None:
    if backend is not None:
        return backend
    return framework_of(first) or "numpy"


def check(call: Any) -> None:
    """The value checks of a class-parallel call: eager torch calls check on every rank together
    (``agree_on_values``); traced calls mark bad tokens NaN, as everywhere."""
    if call.st.mark_nan:
        if call.check_sides:
            check_concrete_sides(call)
        return
    agree_on_values(call, call.be.run(value_flags, call.st, *call.arrays))


def agree_on_values(call: Any, flags: Any) -> None:
    """Eager checks (torch): the value-check flags of every rank gathered, so a bad value in one
    rank's slice is an error on every rank. The rank that holds it raises its own message."""
    split = call.st.class_parallel
    be = call.be
    mine = [int(bool(be.to_numpy(f))) for f in flags.values()] or [0]
    rows, _ = be.gather_ints(split.handle, mine, None, None)
    bad = [r for r, o in enumerate(rows) if any(o)]
    if not bad:
        return
    try:
        raise_value_error(call, call.shape)  # every rank runs it: its probability-row sums are collective
    except XSeqLossError as exc:
        raise XSeqLossError(f"{exc} [{split.describe()}]") from None
    raise XSeqLossError(f"class_parallel: the value checks failed on rank(s) {bad} (each raises the error with its "
                        f"argument, position and value); nothing was computed on rank {split.rank}")


def unwrap_dtensor(logits: Any, kw: dict, class_axis: int, names: tuple) -> tuple[Any, dict]:
    """A torch DTensor of logits (or anything else, unchanged): its local slice, with
    ``class_parallel`` set from its placement (backends/torch/class_parallel.py)."""
    if type(logits).__name__ != "DTensor":
        return logits, kw
    be = _dispatch.load("torch")
    if not be.is_dtensor(logits):
        return logits, kw
    return be.from_dtensor(logits, kw, class_axis, names)


def check_with(call: Any, local_check: Callable[[], None]) -> None:
    """A class-parallel call's eager value checks by ``local_check`` (which raises the error of the
    first bad value), made an error on every rank (torch: one small all_gather of the outcome)."""
    if call.st.mark_nan:
        if call.check_sides:
            check_concrete_sides(call)
        return
    err = None
    try:
        local_check()
    except XSeqLossError as exc:
        err = exc
    split = call.st.class_parallel
    if split.engine != "torch":
        if err is not None:
            raise err
        return
    rows, _ = call.be.gather_ints(split.handle, [int(err is not None)], None, None)
    bad = [r for r, o in enumerate(rows) if o[0]]
    if err is not None:
        raise XSeqLossError(f"{err} [{split.describe()}]") from None
    if bad:
        raise XSeqLossError(f"class_parallel: the value checks failed on rank(s) {bad} (each raises the error with "
                            f"its argument, position and value); nothing was computed on rank {split.rank}")


def fix_chunks(call: Any, user_chunk: Any) -> None:
    """The fused layer under a torch class split: every worker runs the same chunks (sized by the
    largest slice), so that each chunk's collectives pair up across the ranks."""
    split, lay = call.st.class_parallel, call.st.linear
    if user_chunk is None and split.sizes:
        tokens = 1
        for d in call.tok_shape:
            tokens *= int(d)
        chunk = max(1, min(call.be.linear_chunk_bytes // (16 * max(split.sizes)), max(tokens, 1)))
        call.st = replace(call.st, linear=replace(lay, chunk=chunk))
