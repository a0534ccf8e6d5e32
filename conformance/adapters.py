"""How the suite calls xseqloss on each framework and device.

One small class per framework with the same few methods: list the devices,
move a NumPy array there in a given dtype, call the loss and its gradient
(eagerly or compiled) and bring the results back as float64 NumPy arrays.
Nothing here knows about the semantics of the loss.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

FLOAT_ARRAYS = ("weights", "class_weights")


@dataclass
class Outcome:
    """What one call gave, already on the host as float64 NumPy arrays."""
    value: np.ndarray
    grad: np.ndarray | None
    value_dtype: str
    grad_dtype: str | None
    device: str                 # where the result lives, in the suite's words ("cpu", "cuda:0", "gpu:0")
    type_ok: bool               # the result is the framework's own array type
    grad_error: str = ""        # why the gradient could not be computed (the value could)


def _np_dtype_name(x: Any) -> str:
    return str(getattr(x, "dtype", type(x).__name__))


def side_dtype(name: str, dtype: str) -> str | None:
    """The float dtype a side array travels in (None: keep its NumPy dtype)."""
    if name in FLOAT_ARRAYS:
        return "float64" if dtype == "float64" else "float32"
    return None


class Adapter:
    name = ""
    module = ""
    compiler = ""               # what "compiled" means here ("" for none)

    def available(self) -> bool:
        try:
            importlib.import_module(self.module)
            return True
        except Exception:
            return False

    def devices(self) -> list[str]:
        return ["cpu"]

    # -- to implement
    def put(self, a: np.ndarray, dtype: str | None, device: str) -> Any:
        raise NotImplementedError

    def host(self, x: Any) -> np.ndarray:
        raise NotImplementedError

    def run(self, fn: Callable, arrays: dict, dtype: str, device: str, compiled: bool = False,
            grad: bool = True, options: dict | None = None, cotangent: Any = None,
            held: list | None = None, ragged: str | None = None) -> Outcome:
        """``fn(logits, targets, side)`` and d sum(cotangent * fn) / d logits (cotangent: None for 1,
        a number, or a NumPy array of the value's shape; ``options``: the NumPy backend's).
        ``held``: a list that receives the gradient as the framework returned it (kept alive by
        the caller, to check that a later call does not overwrite it)."""
        raise NotImplementedError

    upstream = True             # the framework takes an upstream gradient (autodiff)

    @contextlib.contextmanager
    def engine(self, kernel: str, **sizes: int):
        """Within the block, xseqloss runs this backend's ``kernel`` (xseqloss/plan/engine.py) with
        these sizes: the suite forces every kernel of a backend and checks each alike."""
        from xseqloss.internals import engine as _engine
        with _engine.use(self.name, kernel, **sizes):
            yield

    # -- shared
    def put_all(self, arrays: dict, dtype: str, device: str) -> tuple[Any, Any, dict]:
        """Logits, targets and the side arrays on ``device``; floats in the case's dtype."""
        x = self.put(arrays["logits"], dtype, device)
        t = arrays["targets"]
        t = self.put(t, dtype if t.dtype.kind == "f" else None, device)
        side = {k: self.put(v, side_dtype(k, dtype), device) for k, v in arrays.items()
                if k not in ("logits", "targets")}
        return x, t, side

    @contextlib.contextmanager
    def context(self, dtype: str, device: str):
        yield

    # -- ragged inputs (API.md 7.1): the padded case as the user would hold it
    RAGGED_SIDES = ("mask", "weights", "segment_ids")

    def ragged(self, kind: str, x: Any, t: Any, side: dict) -> tuple[Any, Any, dict, Callable]:
        """(logits, targets, side, back) in the ragged form ``kind`` for this framework, built from
        the padded arrays and ``side["lengths"]`` ("NTC"); back(value) turns a reduction="none"
        result into the padded (N, T) array. The base form: per-sequence lists of the targets and
        of the token side arrays, the logits padded (NumPy, JAX; and what a framework does not have)."""
        lengths = [int(v) for v in np.asarray(self.host(side["lengths"]))]
        side = dict(side)
        side.pop("lengths")
        t = [t[i, :n] for i, n in enumerate(lengths)]
        for k in self.RAGGED_SIDES:
            if k in side:
                side[k] = [side[k][i, :n] for i, n in enumerate(lengths)]
        return x, t, side, (lambda v: v)


def _loss_fn(options: dict) -> Callable:
    """The loss the suite calls. ``options["_loss"] == "linear"``: ``linear_cross_entropy`` of the
    "logits" as hidden states with an identity weight (the logits it means are the hidden states
    themselves), so every case of the error catalogue applies to the fused layer too."""
    import xseqloss as xsl
    options = dict(options)
    if options.pop("_loss", "sequence") == "linear":
        layout = options.pop("layout", "NTC").replace("C", "H")

        def linear(x, t, side):
            return xsl.linear_cross_entropy(x, identity(x, layout), t, layout=layout, chunk_size=2, **side, **options)
        return linear

    def fn(x, t, side):
        return xsl.sequence_cross_entropy(x, t, **side, **options)
    return fn


def identity(x: Any, layout: str) -> Any:
    """An identity (C, C) weight in x's framework, dtype and device (C: x's H axis)."""
    C = x.shape[layout.index("H")]
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch
        return torch.eye(C, dtype=x.dtype, device=x.device)
    if mod.startswith("tensorflow"):
        import tensorflow as tf
        return tf.eye(C, dtype=x.dtype)
    if mod.startswith("jax"):
        import jax.numpy as jnp
        return jnp.eye(C, dtype=x.dtype)
    return np.eye(C, dtype=x.dtype)


# ----------------------------------------------------------------------------- NumPy

class NumpyAdapter(Adapter):
    name = module = "numpy"
    upstream = False  # no autodiff: value_and_grad gives d sum(loss) / d logits

    @contextlib.contextmanager
    def context(self, dtype, device):
        import xseqloss as xsl
        with xsl.use_backend("numpy"):  # NumPy logits go to the default backend: make sure it is numpy
            yield

    def put(self, a, dtype, device):
        a = np.asarray(a)
        if dtype is None:
            return a.copy()
        if dtype == "bfloat16":
            import ml_dtypes
            return a.astype(np.float32).astype(ml_dtypes.bfloat16)
        return a.astype(dtype)

    def host(self, x):
        a = np.asarray(x)
        return a.astype(np.float64) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a

    def run(self, fn, arrays, dtype, device, compiled=False, grad=True, options=None, cotangent=None,
            held=None, ragged=None):
        import xseqloss as xsl
        if cotangent is not None:
            raise NotImplementedError("NumPy has no upstream gradient")
        x, t, side = self.put_all(arrays, dtype, device)
        with self.context(dtype, device):
            out = fn(x, t, side)
            g, why = None, ""
            if grad:  # NumPy has no autodiff: the package's analytic gradient
                try:
                    rx, rt, rs, _ = self.ragged(ragged, x, t, side) if ragged else (x, t, side, None)
                    opts = dict(options)
                    if opts.pop("_loss", None) == "linear":  # W = I: d hidden is d logits
                        layout = opts.pop("layout").replace("C", "H")
                        g = xsl.linear_value_and_grad(rx, identity(rx, layout), rt, layout=layout, chunk_size=2,
                                                      **rs, **opts)[1][0]
                    else:
                        _, g = xsl.value_and_grad(rx, rt, **rs, **opts)
                except Exception as exc:
                    why = f"value_and_grad raised {type(exc).__name__}: {exc}"
            if held is not None:
                held.append(g)
        return Outcome(self.host(out), None if g is None else self.host(g), _np_dtype_name(out),
                       None if g is None else _np_dtype_name(g), "cpu",
                       isinstance(out, (np.ndarray, np.generic)) and (g is None or isinstance(g, np.ndarray)),
                       why)


# ----------------------------------------------------------------------------- PyTorch

class TorchAdapter(Adapter):
    name = module = "torch"
    compiler = "torch.compile"

    def devices(self):
        import torch
        devs = ["cpu"]
        if torch.cuda.is_available():
            devs.append("cuda:0")
        return devs

    def put(self, a, dtype, device):
        import torch
        a = np.asarray(a)
        if dtype is None:
            return torch.as_tensor(a.copy(), device=device)
        if dtype == "bfloat16":  # exact: the values were rounded to bfloat16 already
            return torch.as_tensor(a.astype(np.float32), device=device).to(torch.bfloat16)
        return torch.as_tensor(a.astype(dtype), device=device)

    def host(self, x):
        import torch
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.to(torch.float64)
        return x.numpy()

    def ragged(self, kind, x, t, side):
        import torch
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        if kind == "list":
            return super().ragged(kind, x, t, side)
        side = dict(side)
        lengths = side.pop("lengths").cpu()
        N, T = x.shape[0], x.shape[1]
        if kind == "native":  # PackedSequence, unsorted: per_sequence must come back in the caller's order
            pack = lambda a: pack_padded_sequence(a, lengths, batch_first=True, enforce_sorted=False)  # noqa: E731
            back = lambda v: pad_packed_sequence(v, batch_first=True, total_length=T)[0] \
                if isinstance(v, torch.nn.utils.rnn.PackedSequence) else v  # noqa: E731
        else:  # nested jagged tensors
            real = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)]).to(x.device)

            def pack(a):
                return torch.nested.nested_tensor_from_jagged(a[real.to(a.device)], offsets, max_seqlen=T)
            back = lambda v: torch.nested.to_padded_tensor(v, 0.0, output_size=(N, T)) if v.is_nested else v  # noqa: E731
        out_side = {k: (pack(v) if k in self.RAGGED_SIDES else v) for k, v in side.items()}
        return pack(x), pack(t), out_side, back

    def run(self, fn, arrays, dtype, device, compiled=False, grad=True, options=None, cotangent=None,
            held=None, ragged=None):
        import torch
        x, t, side = self.put_all(arrays, dtype, device)
        if grad:
            x.requires_grad_(True)
        f = fn
        if compiled:
            torch._dynamo.reset()
            f = torch.compile(fn, dynamic=False, fullgraph=True)
        out = f(x, t, side)
        g, why = None, ""
        if grad:
            try:
                if cotangent is None:
                    out.sum().backward()
                else:
                    ct = torch.as_tensor(np.asarray(cotangent, np.float64), device=out.device).to(out.dtype)
                    (out * ct).sum().backward()
                g = x.grad
                if held is not None:
                    held.append(g)
            except Exception as exc:
                why = f"backward raised {type(exc).__name__}: {exc}"
        dev = str(out.device)
        return Outcome(self.host(out), None if g is None else self.host(g),
                       str(out.dtype).replace("torch.", ""),
                       None if g is None else str(g.dtype).replace("torch.", ""),
                       "cpu" if dev == "cpu" else (dev if ":" in dev else dev + ":0"),
                       isinstance(out, torch.Tensor), why)


# ----------------------------------------------------------------------------- TensorFlow

class TensorflowAdapter(Adapter):
    name = module = "tensorflow"
    compiler = "tf.function(jit_compile=True)"

    def devices(self):
        import tensorflow as tf
        devs = ["cpu"]
        if tf.config.list_physical_devices("GPU"):
            devs.append("gpu:0")
        return devs

    @staticmethod
    def tf_device(device):
        return "/CPU:0" if device == "cpu" else "/GPU:" + device.split(":")[1]

    def put(self, a, dtype, device):
        import tensorflow as tf
        a = np.asarray(a)
        with tf.device(self.tf_device(device)):
            if dtype is None:
                return tf.identity(tf.constant(a))
            if dtype == "bfloat16":
                return tf.cast(tf.constant(a.astype(np.float32)), tf.bfloat16)
            return tf.identity(tf.constant(a.astype(dtype)))

    def host(self, x):
        import tensorflow as tf
        if x.dtype.is_floating:
            x = tf.cast(x, tf.float64)
        return x.numpy()

    def ragged(self, kind, x, t, side):
        import tensorflow as tf
        if kind != "native":
            return super().ragged(kind, x, t, side)
        side = dict(side)
        lengths = side.pop("lengths")
        N, T = x.shape[0], x.shape[1]
        pack = lambda a: tf.RaggedTensor.from_tensor(a, lengths=lengths)  # noqa: E731
        back = lambda v: v.to_tensor(shape=[N, T]) if isinstance(v, tf.RaggedTensor) else v  # noqa: E731
        out_side = {k: (pack(v) if k in self.RAGGED_SIDES else v) for k, v in side.items()}
        return pack(x), pack(t), out_side, back

    @contextlib.contextmanager
    def context(self, dtype, device):
        import tensorflow as tf
        with tf.device(self.tf_device(device)):
            yield

    def run(self, fn, arrays, dtype, device, compiled=False, grad=True, options=None, cotangent=None,
            held=None, ragged=None):
        import tensorflow as tf
        x, t, side = self.put_all(arrays, dtype, device)

        def both(x, t, side):
            if not grad:
                return fn(x, t, side), None
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = fn(x, t, side)
                total = tf.reduce_sum(out if cotangent is None else
                                      out * tf.constant(np.asarray(cotangent), dtype=out.dtype))
            return out, tape.gradient(total, x)

        if compiled:
            tf.get_logger().setLevel("ERROR")  # a fresh tf.function per case is the point: no retracing warnings
        f = tf.function(both, jit_compile=True) if compiled else both
        with tf.device(self.tf_device(device)):
            out, g = f(x, t, side)
        if held is not None:
            held.append(g)
        dev = out.device.lower()
        where = "gpu:" + dev.rsplit(":", 1)[1] if "gpu" in dev else "cpu"
        return Outcome(self.host(out), None if g is None else self.host(g), out.dtype.name,
                       None if g is None else g.dtype.name, where, isinstance(out, tf.Tensor))


# ----------------------------------------------------------------------------- JAX

class JaxAdapter(Adapter):
    name = module = "jax"
    compiler = "jax.jit"

    def devices(self):
        import jax
        devs = ["cpu"]
        try:
            if jax.devices("gpu"):
                devs.append("gpu:0")
        except RuntimeError:
            pass
        return devs

    @staticmethod
    def jax_device(device):
        import jax
        if device == "cpu":
            return jax.devices("cpu")[0]
        return jax.devices("gpu")[int(device.split(":")[1])]

    @contextlib.contextmanager
    def context(self, dtype, device):
        import jax
        # float64 needs x64; scoped, so that nothing else in the process sees it flipped.
        with jax.enable_x64(dtype == "float64"):
            yield

    def put(self, a, dtype, device):
        import jax
        import jax.numpy as jnp
        a = np.asarray(a)
        if dtype == "bfloat16":
            a = a.astype(np.float32)
        elif dtype is not None:
            a = a.astype(dtype)
        x = jax.device_put(a, self.jax_device(device))
        return x.astype(jnp.bfloat16) if dtype == "bfloat16" else x

    def host(self, x):
        a = np.asarray(x)
        return a.astype(np.float64) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a

    def run(self, fn, arrays, dtype, device, compiled=False, grad=True, options=None, cotangent=None,
            held=None, ragged=None):
        import jax
        with self.context(dtype, device):
            x, t, side = self.put_all(arrays, dtype, device)

            def total(x, t, side):
                out = fn(x, t, side)
                return (out.sum() if cotangent is None else (out * np.asarray(cotangent)).sum()), out

            if grad:
                f = jax.value_and_grad(total, has_aux=True)
                f = jax.jit(f) if compiled else f
                (_, out), g = f(x, t, side)
            else:
                f = jax.jit(fn) if compiled else fn
                out, g = f(x, t, side), None
            if held is not None:
                held.append(g)
            dev = list(out.devices())[0]
            where = "cpu" if dev.platform == "cpu" else f"gpu:{dev.id}"
            return Outcome(self.host(out), None if g is None else self.host(g), str(out.dtype),
                           None if g is None else str(g.dtype), where, isinstance(out, jax.Array))


ADAPTERS: dict[str, Adapter] = {a.name: a for a in
                                (NumpyAdapter(), TorchAdapter(), TensorflowAdapter(), JaxAdapter())}


def call(adapter: Adapter, arrays: dict, options: dict, dtype: str, device: str, compiled: bool = False,
         grad: bool = True, cotangent: Any = None, held: list | None = None, ragged: str | None = None) -> Outcome:
    """The loss (and d sum(cotangent * loss) / d logits) of xseqloss on one backend and device.
    ``ragged``: the inputs travel in that ragged form (Adapter.ragged), the result comes back padded."""
    fn = _loss_fn(options)
    if ragged:
        padded_fn = fn

        def fn(x, t, side):
            rx, rt, rs, back = adapter.ragged(ragged, x, t, side)
            return back(padded_fn(rx, rt, rs))
    return adapter.run(fn, arrays, dtype, device, compiled=compiled, grad=grad, options=options,
                       cotangent=cotangent, held=held, ragged=ragged)
