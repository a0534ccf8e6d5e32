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
            held: list | None = None) -> Outcome:
        """``fn(logits, targets, side)`` and d sum(cotangent * fn) / d logits (cotangent: None for 1,
        a number, or a NumPy array of the value's shape; ``options``: the NumPy backend's).
        ``held``: a list that receives the gradient as the framework returned it (kept alive by
        the caller, to check that a later call does not overwrite it)."""
        raise NotImplementedError

    upstream = True             # the framework takes an upstream gradient (autodiff)

    @contextlib.contextmanager
    def engine(self, kernel: str, **sizes: int):
        """Within the block, xseqloss runs this backend's ``kernel`` (xseqloss/_engine.py) with
        these sizes: the suite forces every kernel of a backend and checks each alike."""
        from xseqloss import _engine
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


def _loss_fn(options: dict) -> Callable:
    import xseqloss as xsl

    def fn(x, t, side):
        return xsl.sequence_cross_entropy(x, t, **side, **options)
    return fn


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
            held=None):
        import xseqloss as xsl
        if cotangent is not None:
            raise NotImplementedError("NumPy has no upstream gradient")
        x, t, side = self.put_all(arrays, dtype, device)
        with self.context(dtype, device):
            out = fn(x, t, side)
            g, why = None, ""
            if grad:  # NumPy has no autodiff: the package's analytic gradient
                try:
                    _, g = xsl.value_and_grad(x, t, **side, **options)
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

    def run(self, fn, arrays, dtype, device, compiled=False, grad=True, options=None, cotangent=None,
            held=None):
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

    @contextlib.contextmanager
    def context(self, dtype, device):
        import tensorflow as tf
        with tf.device(self.tf_device(device)):
            yield

    def run(self, fn, arrays, dtype, device, compiled=False, grad=True, options=None, cotangent=None,
            held=None):
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
            held=None):
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
         grad: bool = True, cotangent: Any = None, held: list | None = None) -> Outcome:
    """The loss (and d sum(cotangent * loss) / d logits) of xseqloss on one backend and device."""
    return adapter.run(_loss_fn(options), arrays, dtype, device, compiled=compiled, grad=grad,
                       options=options, cotangent=cotangent, held=held)
