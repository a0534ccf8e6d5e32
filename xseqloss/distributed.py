"""Tokens split across workers (API.md 9.1): the global counts that make a sharded loss exact.

The mean over all workers' tokens is the sum of the local loss sums divided by the global count,
so every worker divides its own sum by the *global* denominator and the gradients are summed::

    loss_w = sum of worker w's token losses / (sum over all workers of their counts)

``xsl.sequence_cross_entropy(z, y, normalizer=G)`` computes ``loss_w`` when ``G`` is the global
count, and the sum over workers of ``loss_w`` (and of its gradients) is the single-process loss
(and gradient) of the whole batch, however unevenly the tokens fall, including a worker with no
token at all (its loss and gradient are exactly 0; no NaN). Dividing by the local count instead
and averaging the gradients (what DDP does with a plain ``reduction="mean"``) is right only when
all counts are equal (Megatron-LM issue 4590); docs/distributed.md has the derivation.

* ``global_token_count(targets, group=..., axis_name=..., **token_count options)``: the
  ``xsl.token_count`` of the local targets (the denominator ``reduction="mean"`` would use, with
  ``shift``, ``segment_ids``, ``mask``, ``lengths``, ``ignore_index``, ``weights``,
  ``class_weights`` and ``denominator`` honoured) summed over the workers with one scalar
  all-reduce. For frameworks that **sum** gradients over the workers (a manual
  ``all_reduce(SUM)`` of the gradients, ``jax.lax.psum`` of gradients in ``shard_map``, ``tf.distribute``
  in a custom loop, the Keras optimizer under ``MirroredStrategy``).
* ``ddp_normalizer(targets, group=...)``: the global count divided by the number of workers, for
  frameworks that **average** gradients over the group (PyTorch DDP and FSDP): DDP divides the
  summed gradients by the world size again, so the result is exact.
* ``global_segment_count`` (``reduction="segment_mean"``: the number of documents) and
  ``global_sequence_count`` (``reduction="sequence_mean"``: the number of sequences, all N rows),
  the ``normalizer`` of those reductions.

Where the sum runs:

* PyTorch: ``torch.distributed.all_reduce`` over ``group`` (None: the default group); an error
  if ``torch.distributed`` is not initialised.
* JAX: ``jax.lax.psum(count, axis_name)`` inside ``shard_map`` / ``pmap``. ``axis_name`` is
  required there (a count traced inside a named map without it is an error; ``axis_name=()``
  explicitly counts this shard only). Under plain ``jax.jit`` with the batch sharded by a
  ``NamedSharding`` the targets are one global array: their count is already global and no
  collective is needed (the compiler inserts the cross-device sum), so call it without
  ``axis_name`` (or just ``xsl.token_count``).
* TensorFlow: inside ``strategy.run`` the replica context's ``all_reduce(SUM, count)``; outside a
  replica context (or with one replica) the local count, which is then the count of the global
  batch.
* NumPy: one process, no collective: the local count; ``group`` or ``axis_name`` is an error.

Validation. Every check of ``token_count`` runs locally first. On PyTorch a rank whose local check
fails still takes part in the one all-reduce, contributing NaN, and then raises its own error;
every other rank sees the NaN sum and raises ``XSeqLossError`` too, so no rank waits forever in
the collective for a rank that has already raised. (Reading the sum back for that check is one
host synchronisation of a scalar; with ``validate=False`` it is skipped, and the other ranks then
get a NaN count instead of an error.) What is not checked, because it would cost more
communication: that every worker passes the same options (``shift``, ``denominator``,
``ignore_index``, ...) and reduces over the same group that the gradients are reduced over.
Workers that disagree on options get a count that means nothing; a count reduced over the wrong
group (e.g. the data-parallel group only, when the gradients are also summed over the
context-parallel ranks) is off by the size of the missing group (verl issue 5983).

Classes split across workers (``class_parallel``, API.md 9.2) are xseqloss/class_parallel.py.

>>> import numpy as np, xseqloss as xsl
>>> y = np.array([[3, 1, -100], [2, -100, -100]])
>>> int(xsl.global_token_count(y))        # NumPy: one process, the local count
3
>>> int(xsl.global_token_count(np.array([[3, 1, 4, -100]]), shift=1))  # the shifted targets 1 and 4
2
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _dispatch
from ._errors import XSeqLossTypeError
from .api import ragged as _ragged
from .core.sides import framework_of
from .loss import _token_call, segment_count, token_count

__all__ = ["global_token_count", "global_segment_count", "global_sequence_count", "ddp_normalizer"]


# ------------------------------------------------------------------------------------ public


def global_token_count(targets: Any, *, group: Any = None, axis_name: Any = None, **token_count_options: Any) -> Any:
    """``xsl.token_count(targets, **token_count_options)`` summed over all workers (one scalar all-reduce).

    Pass it as ``normalizer=`` when the gradients are **summed** over the workers: each worker's
    loss is then its share of the global mean, and the sum of the workers' losses and gradients
    equals the single-process loss and gradient of the whole batch. Where the framework *averages*
    gradients over the group (PyTorch DDP / FSDP) use ``ddp_normalizer`` instead.

    Args:
        targets: the worker's local targets, exactly as given to ``sequence_cross_entropy``
            (a list of per-sequence arrays, a PackedSequence, ... too).
        group: PyTorch only: the ``torch.distributed`` process group to sum over (None: the
            default group). It must be the group the gradients are reduced over (with context
            parallelism: every rank that holds part of the batch, data x context parallel).
        axis_name: JAX only: the mesh axis name (or tuple of names) inside ``shard_map`` / ``pmap``;
            ``()`` counts this shard only. Not needed under plain ``jax.jit`` with sharded global
            arrays (their count is already global).
        **token_count_options: every option of ``xsl.token_count`` (``layout``, ``mask``,
            ``lengths``, ``ignore_index``, ``weights``, ``class_weights``, ``denominator``,
            ``num_classes``, ``validate``, ``backend``, ``shift``, ``segment_ids``): the same as
            the loss's, on every worker.

    Returns:
        A scalar of the targets' framework on their device: an integer count (float when weights
        enter the denominator), the same on every worker.

    A PyTorch data-parallel loop where the gradients are summed by hand::

        n = xsl.global_token_count(y, shift=1)                  # one all_reduce of a scalar
        loss = xsl.sequence_cross_entropy(logits, y, shift=1, normalizer=n)
        loss.backward()
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad)                # SUM: the full-batch gradient

    JAX, inside ``shard_map`` over the mesh axis "dp"::

        n = xsl.global_token_count(y, axis_name="dp")           # jax.lax.psum(count, "dp")
        loss = jax.lax.psum(xsl.sequence_cross_entropy(z, y, normalizer=n), "dp")

    On NumPy there is one process and no collective:

    >>> import numpy as np, xseqloss as xsl
    >>> y = np.array([[3, 1, -100], [2, -100, -100]])
    >>> int(xsl.global_token_count(y)), int(xsl.token_count(y))
    (3, 3)
    >>> float(xsl.global_token_count(y, weights=np.array([[1.0, 0.5, 1.0], [2.0, 1.0, 1.0]])))
    3.5
    >>> xsl.global_token_count(y, group="dp")
    Traceback (most recent call last):
    ...
    xseqloss._errors.XSeqLossTypeError: global_token_count: group= is a torch.distributed process group, ...
    """
    name = _collective_backend("global_token_count", targets, token_count_options.get("backend"), group, axis_name)
    return _reduce_local(name, "global_token_count", lambda: token_count(targets, **token_count_options),
                         targets, group, axis_name, token_count_options.get("validate", True))


def ddp_normalizer(targets: Any, *, group: Any = None, axis_name: Any = None, **token_count_options: Any) -> Any:
    """``global_token_count(targets, ...) / world_size``: the ``normalizer`` for frameworks that
    **average** gradients over the group (PyTorch DDP and FSDP, which divide the summed gradients
    by the group's size).

    Each worker's loss is ``local sum * world_size / global count``; DDP's averaging divides by
    ``world_size`` again, so the averaged gradient is ``sum of all local sums' gradients / global
    count``: the single-process full-batch gradient, however unevenly the tokens fall. The loss
    value on one rank is not the global mean; the global mean is the *average* of the ranks'
    losses (``all_reduce(loss, AVG)``), or ``loss * world_size`` summed, for logging.

    ``group`` must be the group DDP / FSDP averages over (``DistributedDataParallel(...,
    process_group=group)``; for FSDP with context parallelism the data x context mesh). On JAX
    (``axis_name``) and TensorFlow (replica context) the number of workers is the axis size and
    ``num_replicas_in_sync``; on NumPy it is 1.

    PyTorch DDP::

        model = torch.nn.parallel.DistributedDataParallel(model)
        logits = model(x)
        loss = xsl.sequence_cross_entropy(logits, y, shift=1,
                                          normalizer=xsl.distributed.ddp_normalizer(y, shift=1))
        loss.backward()            # DDP averages: the gradient of the full-batch mean

    >>> import numpy as np, xseqloss as xsl
    >>> float(xsl.distributed.ddp_normalizer(np.array([[3, 1, -100]])))   # one process: the count
    2.0
    """
    name = _collective_backend("ddp_normalizer", targets, token_count_options.get("backend"), group, axis_name)
    count = _reduce_local(name, "ddp_normalizer", lambda: token_count(targets, **token_count_options),
                          targets, group, axis_name, token_count_options.get("validate", True))
    be = _dispatch.load(name)
    world = be.worker_count(group, axis_name)
    return be.cast(count, be.acc_dtype(count)) / world


def global_segment_count(segment_ids: Any, *, group: Any = None, axis_name: Any = None, layout: str = "NTC",
                         backend: str | None = None) -> Any:
    """The number of documents over all workers: the ``normalizer`` of ``reduction="segment_mean"``.

    ``segment_mean`` divides the sum of the per-document means by the number of documents, which
    is the sum of ``xsl.segment_count(segment_ids)`` (every document, whether or not any of its
    tokens count: one without counted tokens has mean 0); this sums it over the workers as
    ``global_token_count`` does (same ``group`` / ``axis_name`` rules). Each document must lie
    entirely on one worker (data parallelism): a document split along T between context-parallel
    ranks has no exact per-document mean without exchanging its denominator.

    >>> import numpy as np, xseqloss as xsl
    >>> int(xsl.global_segment_count(np.array([[0, 0, 1, 1, 1, -1], [5, 5, 5, 2, 5, -1]])))
    5
    """
    name = _collective_backend("global_segment_count", segment_ids, backend, group, axis_name)

    def local() -> Any:
        per_row = segment_count(segment_ids, layout=layout, backend=backend)
        return _dispatch.load(name).sum(per_row, None)

    return _reduce_local(name, "global_segment_count", local, segment_ids, group, axis_name, True)


def global_sequence_count(targets: Any, *, group: Any = None, axis_name: Any = None, layout: str = "NTC",
                          backend: str | None = None) -> Any:
    """The number of sequences over all workers: the ``normalizer`` of ``reduction="sequence_mean"``.

    ``sequence_mean`` is the mean over all N rows of ``per_sequence`` (a row without counted
    tokens counts, with its empty mean), so its normalizer is the sum of the workers' N: the size
    of the batch axis, whatever the mask. Each sequence must lie entirely on one worker (data
    parallelism), as for ``global_segment_count``. Only ``layout`` matters (and ``backend`` for
    NumPy inputs); target values are not checked here.

    >>> import numpy as np, xseqloss as xsl
    >>> int(xsl.global_sequence_count(np.array([[3, 1, -100], [-100, -100, -100]])))
    2
    >>> int(xsl.global_sequence_count([np.array([1, 2]), np.array([3])]))   # ragged: one per list entry
    2
    """
    name = _collective_backend("global_sequence_count", targets, backend, group, axis_name)

    def local() -> Any:
        call = _token_call(targets, layout=layout, mask=None, lengths=None, ignore_index=None, weights=None,
                           class_weights=None, denominator="weights", num_classes=None, validate=False,
                           backend=backend, shift=0, segment_ids=None, reduction="sequence_mean")
        be, o = call.be, call.st.opts
        like = call.y if call.y is not None else call.t  # index targets, or soft ones (logits' shape)
        n = be.dim(like, (o.tok_layout if call.y is not None else o.layout).index("N"))
        if isinstance(n, (int, np.integer)):
            return be.convert(np.asarray(int(n), np.int64), "count", like=like)
        return n  # TensorFlow: a dynamic batch size, already an int64 tensor

    return _reduce_local(name, "global_sequence_count", local, targets, group, axis_name, True)


# ------------------------------------------------------------------------------------ internals


def _framework_of_targets(targets: Any) -> str | None:
    """The framework of the targets, looking through lists of arrays and ragged types."""
    kind = _ragged.kind_of(targets)
    if kind in ("packed", "nested"):
        return "torch"
    if kind == "ragged":
        return "tensorflow"
    if isinstance(targets, (list, tuple)):
        for v in targets:
            owner = framework_of(v)
            if owner is not None:
                return owner
        return None
    return framework_of(targets)


def _collective_backend(fn: str, targets: Any, backend: Any, group: Any, axis_name: Any) -> str:
    """The backend whose collective sums the count, with the static checks of group / axis_name
    (raised on every worker alike, before any computation or collective)."""
    if backend is not None:
        name = _dispatch.check_backend_name(backend)
    else:
        name = _framework_of_targets(targets) or _dispatch.default_backend()
    if group is not None and name != "torch":
        raise XSeqLossTypeError(
            f"{fn}: group= is a torch.distributed process group, but the targets are on the {name!r} backend"
            + ("; on JAX pass axis_name= inside shard_map / pmap" if name == "jax" else
               "; TensorFlow sums over the replica context of strategy.run by itself" if name == "tensorflow"
               else "; NumPy runs in one process and has no collective: use xsl.token_count"))
    if axis_name is not None and name != "jax":
        raise XSeqLossTypeError(
            f"{fn}: axis_name= names a JAX mesh axis (inside shard_map / pmap), but the targets are on the "
            f"{name!r} backend" + ("; on PyTorch pass group= (a torch.distributed process group)" if name == "torch"
                                   else "; TensorFlow sums over the replica context of strategy.run by itself"
                                   if name == "tensorflow" else
                                   "; NumPy runs in one process and has no collective: use xsl.token_count"))
    if name == "torch":
        _dispatch.load("torch").check_workers(fn, group)
    if name == "jax" and axis_name is not None and not isinstance(axis_name, (str, tuple, list)):
        raise XSeqLossTypeError(f"{fn}: axis_name must be a mesh axis name (a string) or a tuple of names, "
                                f"got {axis_name!r}")
    return name


def _reduce_local(name: str, fn: str, local: Any, targets: Any, group: Any, axis_name: Any, validate: bool) -> Any:
    """local() summed over the workers with one scalar all-reduce (see the module docstring): the
    backend's collective (``Backend.sum_over_workers``)."""
    return _dispatch.load(name).sum_over_workers(fn, local, targets, group, axis_name, validate)
