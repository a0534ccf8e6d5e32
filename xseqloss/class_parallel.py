"""Classes split across workers (vocabulary / tensor parallel, API.md 9.2): ``class_parallel``.

Each worker holds a contiguous slice of the class axis, in rank order, of any size, and the same
global targets. The loss is the single-process loss over the global C: the per-token formula of
``_token_loss.token_loss`` is unchanged, and its class sums (the max, sum(exp), the target logit and
class weight, the smoothing sum, sum(q) and q . x) are this worker's partial sums combined over the
workers. Per call that is one all-reduce (max) of a token-sized vector and one all-reduce (sum) of
a few stacked token-sized vectors: O(tokens) bytes, never O(tokens x C). Every worker gets the
same loss; its gradient is its slice of the unsharded gradient, because the sum's backward is the
identity (each worker's upstream gradient of the replicated sums is already the full one).

* PyTorch: ``class_parallel=<ProcessGroup>`` (``torch.distributed.group.WORLD`` for the default
  group), eager. Before the loss one small ``all_gather`` (16 integers per rank) exchanges each
  worker's slice size and a checksum of its options and targets' shape, so the class offsets are
  known and workers that disagree get an error on every rank, never a hang; with
  ``validate=True`` one more small ``all_gather`` of the value-check flags makes a bad value on one
  worker (a negative class weight in its slice) an error on every worker.
* JAX: ``class_parallel="<axis name>"`` (or a tuple of names) inside ``shard_map`` / ``pmap``:
  ``jax.lax.pmax`` and ``jax.lax.psum``; the slice is ``axis_index * local C``. Under plain
  ``jax.jit`` with logits sharded along C by a ``NamedSharding`` no option is needed: the loss is
  the ordinary one and XLA's partitioner splits its class reductions the same way.
* TensorFlow and NumPy: an error (tf.distribute has no tensor parallelism; NumPy has one process).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any

from ._errors import XSeqLossError, XSeqLossTypeError

__all__ = ["Split", "Reducer", "reducer", "prepare", "check"]


@dataclass(frozen=True)
class Split:
    """One worker's place in the class split (part of the call's ``Static``)."""
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


# ------------------------------------------------------------------------------ the reducers

def reducer(ops: Any, split: Split) -> Any:
    """The collectives of the core for one engine: ``max`` (no gradient), ``sums`` (a list of
    arrays summed over the workers in one all-reduce; backward: the identity), ``labels`` (the
    local column of each global label and whether this worker holds it), ``take`` (v[y] of a
    class-sharded vector, from the worker that holds y) and, JAX only, ``valid`` (the columns that
    are real classes, not padding). The engines' own code is beside their backends."""
    if split.engine == "torch":
        from .backends.class_parallel_torch import TorchReducer
        return TorchReducer(split)
    from .backends.class_parallel_jax import JaxReducer
    return JaxReducer(split)


class Reducer:
    def __init__(self, split: Split) -> None:
        self.split = split

    def take(self, vec: Any, y: Any) -> Any:
        yl, own = self.labels(y)
        return self.sums([self._where(own, vec[yl], 0.0)])[0]


# ------------------------------------------------------------------------------ the split

def engine_of(class_parallel: Any, backend_name: str | None) -> str:
    """"torch" or "jax" from the option's type, checked against the array's backend."""
    if isinstance(class_parallel, str) or (isinstance(class_parallel, tuple) and class_parallel
                                           and all(isinstance(a, str) for a in class_parallel)):
        engine = "jax"
    else:
        import sys
        dist = sys.modules.get("torch.distributed")
        if dist is None or not isinstance(class_parallel, dist.ProcessGroup):
            raise XSeqLossTypeError(
                f"class_parallel={class_parallel!r}: expected a torch.distributed ProcessGroup (PyTorch; "
                f"torch.distributed.group.WORLD for the default group) or a JAX mesh axis name (a str or a "
                f"tuple of str, inside shard_map / pmap)")
        engine = "torch"
    if backend_name is not None and backend_name != engine:
        if backend_name in ("tensorflow", "numpy"):
            raise XSeqLossTypeError(f"class_parallel is for PyTorch and JAX: backend {backend_name!r} has no "
                                    f"tensor parallelism (tf.distribute splits data only; NumPy is one process)")
        raise XSeqLossTypeError(f"class_parallel={class_parallel!r} is a {engine} option but the arrays are "
                                f"{backend_name}: a torch ProcessGroup for torch tensors, a mesh axis name for JAX")
    return engine


def _meta(call: Any, num_classes: Any) -> list[int]:
    """This worker's slice size, and a checksum of everything the workers must agree on."""
    st = call.st
    tok = tuple(int(d) for d in call.tok_shape)
    facts = (st.opts, st.soft, st.has_mask, st.has_lengths, st.has_weights, st.has_cw, st.has_normalizer,
             st.has_segments, st.rows, st.mark_bad, num_classes, tok,
             None if call.z is None else call.be.dtype_name(call.z), st.linear and st.linear[:2])
    crc = zlib.crc32(repr(facts).encode()) & 0x7FFFFFFF
    dims = list(tok[:8]) + [-1] * (8 - min(len(tok), 8))
    return [0, int(call.shape[st.opts.k]), crc, len(tok), *dims, 0, 0, 0, 0]


def torch_split(group: Any, call: Any, err: BaseException | None, num_classes: Any, like: Any) -> Split:
    """One all_gather of 16 integers per rank: slice sizes, agreement, and errors on every rank."""
    import torch
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        if err is not None:
            raise err
        raise XSeqLossError("class_parallel: torch.distributed is not initialised (call "
                            "torch.distributed.init_process_group first, e.g. under torchrun)")
    meta = [1] + [0] * 15 if call is None else _meta(call, num_classes)
    device = like.device if isinstance(like, torch.Tensor) and dist.get_backend(group) != "gloo" else "cpu"
    mine = torch.tensor(meta, dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    rows = [o.tolist() for o in out]
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
    sizes = tuple(m[1] for m in rows)
    C = sum(sizes)
    if num_classes is not None and num_classes != C:
        raise XSeqLossError(f"class_parallel: the workers' slices hold C = {C} classes together "
                            f"(slices {list(sizes)} in rank order) but num_classes={num_classes}")
    return Split("torch", group, sizes[rank], C, lo=sum(sizes[:rank]), sizes=sizes, rank=rank)


def jax_split(axis: Any, call: Any, num_classes: Any) -> Split:
    import jax
    try:
        n = jax.lax.psum(1, axis)
    except NameError as exc:
        raise XSeqLossError(f"class_parallel={axis!r} names a JAX mesh axis, which exists only inside shard_map "
                            f"or pmap over that axis ({exc}); under plain jax.jit with a class-sharded "
                            f"NamedSharding pass no class_parallel") from None
    local = int(call.shape[call.st.opts.k])
    width = int(n) * local
    if num_classes is not None and not 1 <= num_classes <= width:
        raise XSeqLossError(f"class_parallel: {int(n)} devices along {axis!r} with {local} classes each hold "
                            f"C = {width} classes but num_classes={num_classes}; valid range [1, {width}] "
                            f"(a smaller num_classes marks the last columns as vocabulary padding)")
    if num_classes is not None and num_classes < width:  # a vocabulary padded to divide evenly
        return Split("jax", axis, local, int(num_classes), padded=True)
    return Split("jax", axis, local, width)


def with_split(st: Any, split: Split) -> Any:
    """The call's Static over the global C."""
    from ._plan import _uniform_eps
    return replace(st, C=split.C, eps=_uniform_eps(st.opts, split.C), class_parallel=split)


# ------------------------------------------------------------------------------ the calls

def prepare(run_local: Any, class_parallel: Any, num_classes: Any, backend_name: str | None, like: Any) -> Any:
    """A class-parallel call's preparation: ``run_local()`` (the local static checks, with the
    local C; returns the call, or a tuple starting with it), then the split (torch: one small
    all_gather, every rank raising if any rank failed), then the Static over the global C."""
    engine = engine_of(class_parallel, backend_name)
    if engine == "torch":
        import torch
        if torch.compiler.is_compiling():  # every rank compiles alike: each raises at trace time
            raise XSeqLossTypeError("class_parallel is not supported under torch.compile: its collectives "
                                    "(torch.distributed, eager) would break the graph; call the loss outside "
                                    "the compiled region, or use a DTensor with torch's own loss_parallel()")
    out = err = None
    try:
        out = run_local()
    except (XSeqLossError, XSeqLossTypeError) as exc:
        if engine != "torch":
            raise
        err = exc
    call = out[0] if isinstance(out, tuple) else out
    if engine == "torch":
        split = torch_split(class_parallel, call, err, num_classes, like)
    else:
        split = jax_split(class_parallel, call, num_classes)
    if num_classes is not None:
        call.st = replace(call.st, opts=replace(call.st.opts, num_classes=num_classes))
    call.st = with_split(call.st, split)
    return out


def backend_name(first: Any, backend: Any) -> str | None:
    if backend is not None:
        return backend
    from . import _dispatch
    return _dispatch.framework_of(first) or "numpy"


def check(call: Any) -> None:
    """The value checks of a class-parallel call: eager torch calls check on every rank together
    (``agree_on_values``); traced calls mark bad tokens NaN, as everywhere."""
    from ._validate import _value_flags, check_concrete_sides
    if call.st.mark_bad:
        if call.check_sides:
            check_concrete_sides(call)
        return
    agree_on_values(call, call.be.run(_value_flags, call.st, *call.arrays))


def agree_on_values(call: Any, flags: Any) -> None:
    """Eager checks (torch): the value-check flags of every rank gathered, so a bad value in one
    rank's slice is an error on every rank. The rank that holds it raises its own message."""
    import torch
    import torch.distributed as dist
    from ._validate import _raise_value_error
    split = call.st.class_parallel
    mine = torch.stack([torch.as_tensor(f).reshape(()) for f in flags.values()]).to(torch.int64) \
        if flags else torch.zeros(1, dtype=torch.int64)
    if dist.get_backend(split.handle) == "gloo":
        mine = mine.cpu()
    out = [torch.empty_like(mine) for _ in range(len(split.sizes))]
    dist.all_gather(out, mine, group=split.handle)
    bad = [r for r, o in enumerate(out) if bool(o.any())]
    if not bad:
        return
    try:
        _raise_value_error(call, call.shape)  # every rank runs it: its probability-row sums are collective
    except XSeqLossError as exc:
        raise XSeqLossError(f"{exc} [{split.describe()}]") from None
    raise XSeqLossError(f"class_parallel: the value checks failed on rank(s) {bad} (each raises the error with its "
                        f"argument, position and value); nothing was computed on rank {split.rank}")


# ------------------------------------------------------------------------------ DTensor

def is_dtensor(x: Any) -> bool:
    import sys
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(x, DTensor)


def from_dtensor(logits: Any, kw: dict, class_axis: int, names: tuple) -> tuple[Any, dict]:
    """A DTensor of logits sharded along the class axis: its local slice, ``class_parallel`` set to
    the mesh dimension's process group, and every other DTensor argument as its local part. The
    other mesh dimensions must replicate the logits (a batch sharded over another mesh dimension
    would make the loss a local mean: give that dimension's tokens a global normalizer instead)."""
    from torch.distributed.tensor import Replicate, Shard
    if kw.get("class_parallel") is not None:
        raise XSeqLossTypeError("class_parallel: the logits are a DTensor, whose placement already says how the "
                                "classes are split; pass class_parallel=None")
    nd = logits.ndim
    k = class_axis % nd
    dims = [i for i, p in enumerate(logits.placements) if isinstance(p, Shard) and p.dim % nd == k]
    others = [(i, p) for i, p in enumerate(logits.placements) if i not in dims and not isinstance(p, Replicate)]
    if len(dims) != 1 or others:
        raise XSeqLossError(f"logits are a DTensor with placements {tuple(logits.placements)} on mesh "
                            f"{tuple(logits.device_mesh.mesh.shape)}: xseqloss takes a DTensor sharded along the "
                            f"class axis (Shard({k})) on exactly one mesh dimension and replicated on the others; "
                            f"redistribute it, or pass the local tensor with class_parallel=<group>")
    group = logits.device_mesh.get_group(dims[0])
    out = dict(kw, class_parallel=group)
    for name in names:
        v = kw.get(name)
        if is_dtensor(v):
            out[name] = v.to_local()
    return logits.to_local(), out
