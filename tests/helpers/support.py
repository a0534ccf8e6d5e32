"""Test support shared by the test modules: backend adapters, tolerances,
rounding helpers and the XSEQLOSS_REQUIRE_BACKENDS rule.  (Kept out of
conftest.py so that modules can import it: ``from helpers.support import ...``.)
"""

import importlib
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ALL_BACKENDS = ("numpy", "torch", "tensorflow", "jax")
FRAMEWORK_MODULE = {"numpy": "numpy", "torch": "torch",
                    "tensorflow": "tensorflow", "jax": "jax"}

# |x - ref| / (1 + |ref|) tolerances, API.md section 6
TOL = {"float64": 1e-10, "float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}
# result dtype per input dtype (decisions.md item 13)
OUT_DTYPE = {"float64": "float64", "float32": "float32",
             "float16": "float32", "bfloat16": "float32"}
# hypothesis examples per property and backend (JAX and TF compile per option set)
HYP_EXAMPLES = {"numpy": 30, "torch": 25, "tensorflow": 10, "jax": 6}


def reductions_for(backend, reductions, key):
    """The reductions a grid test runs on `backend`.

    JAX (jax.jit) and TensorFlow (tf.function) compile once per shape and
    option set (0.1-0.5 s each here), so on them a grid cell runs "none" and
    "mean" (they carry the per-token loss and the denominator) plus one more
    reduction that rotates with `key`; across the grid every reduction still
    runs on every backend.  NumPy and PyTorch run all of them everywhere.
    """
    reductions = list(reductions)
    if backend.name not in ("jax", "tensorflow"):
        return reductions
    base = [r for r in reductions if r in ("none", "mean")]
    rest = [r for r in reductions if r not in base]
    if rest:
        base.append(rest[sum(map(ord, str(key))) % len(rest)])
    return base


def required_backends():
    value = os.environ.get("XSEQLOSS_REQUIRE_BACKENDS", "").strip()
    if not value:
        return set()
    if value.lower() == "all":
        return set(ALL_BACKENDS)
    names = {v.strip().lower() for v in value.split(",") if v.strip()}
    unknown = names - set(ALL_BACKENDS)
    if unknown:
        raise pytest.UsageError(
            f"XSEQLOSS_REQUIRE_BACKENDS names unknown backend(s) {sorted(unknown)}; "
            f"valid: {', '.join(ALL_BACKENDS)} or 'all'")
    return names


_IMPORT_ERRORS = {}


def _framework_error(name):
    """None when the framework imports, else the import error's text."""
    if name not in _IMPORT_ERRORS:
        try:
            importlib.import_module(FRAMEWORK_MODULE[name])
            _IMPORT_ERRORS[name] = None
        except Exception as exc:  # a broken install can raise anything
            _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
    return _IMPORT_ERRORS[name]


def import_or_skip(name, minversion=None):
    """Import a test dependency that is not a backend (transformers, accelerate, flax, keras): skip
    when missing, except in CI (XSEQLOSS_REQUIRE_BACKENDS=all), where the requirements install it and
    its absence means a broken environment: an error, not a skip."""
    if os.environ.get("XSEQLOSS_REQUIRE_BACKENDS", "").strip().lower() == "all":
        return importlib.import_module(name)
    return pytest.importorskip(name, minversion=minversion)


def require_or_skip(name):
    err = _framework_error(name)
    if err is None:
        return
    if name in required_backends():
        pytest.fail(f"backend {name!r} is required (XSEQLOSS_REQUIRE_BACKENDS) "
                    f"but cannot be imported: {err}", pytrace=False)
    pytest.skip(f"{name} not importable: {err}")


# --------------------------------------------------------------------------
# dtype helpers (NumPy side)
# --------------------------------------------------------------------------

def np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def round_to(x, dtype):
    """Round float64 values to `dtype` and back: the reference's inputs."""
    return np.asarray(x, np.float64).astype(np_dtype(dtype)).astype(np.float64)


def rel_err(got, ref):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    same_nan = np.isnan(got) & np.isnan(ref)
    same_inf = np.isinf(got) & np.isinf(ref) & (np.sign(got) == np.sign(ref))
    with np.errstate(invalid="ignore"):
        err = np.abs(got - ref) / (1.0 + np.abs(ref))
    err = np.where(same_nan | same_inf, 0.0, err)
    err = np.where(np.isnan(err), np.inf, err)
    return float(err.max()) if err.size else 0.0


def assert_close(got, ref, dtype="float64", what="value", tol=None):
    tol = TOL[dtype] if tol is None else tol
    e = rel_err(got, ref)
    assert e <= tol, (f"{what}: max |x-ref|/(1+|ref|) = {e:.3g} > {tol:g} ({dtype})\n"
                      f"got={np.asarray(got)!r}\nref={np.asarray(ref)!r}")


# --------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------

SIDE_ARRAYS = ("mask", "lengths", "weights", "class_weights")


class Backend:
    """Framework adapter used by the tests (not by the package)."""

    name = None
    supports = ("float16", "bfloat16", "float32", "float64")

    # ---- conversion -----------------------------------------------------
    def array(self, x, dtype=None):
        raise NotImplementedError

    def to_numpy(self, x):
        """Framework value -> NumPy (floats as float64, ints/bools kept)."""
        raise NotImplementedError

    def dtype_name(self, x):
        raise NotImplementedError

    def is_native(self, x):
        raise NotImplementedError

    def float_out(self, x):
        return np.asarray(self.to_numpy(x), np.float64)

    def side_float_dtype(self, dtype):
        return dtype if dtype in ("float32", "float64") else "float32"

    def convert_args(self, logits, targets, dtype, opts, native=True):
        """NumPy logits/targets/side arrays -> framework arrays.

        Float side arrays use the logits' dtype (float32 for f16/bf16 logits);
        soft targets use the logits' dtype.  Integer and bool arrays keep their
        dtype.  With ``native=False`` side arrays stay NumPy.
        """
        x = self.array(np.asarray(logits).astype(np_dtype(dtype)))
        targets = np.asarray(targets)
        if targets.dtype.kind == "f":
            t = self.array(targets.astype(np_dtype(dtype))) if native else targets.astype(np_dtype(dtype))
        else:
            t = self.array(targets) if native else targets
        kw = dict(opts)
        if native:
            sd = self.side_float_dtype(dtype)
            for k in SIDE_ARRAYS:
                v = kw.get(k)
                if isinstance(v, np.ndarray):
                    if v.dtype.kind == "f":
                        v = v.astype(np_dtype(sd))
                    kw[k] = self.array(v)
        return x, t, kw

    # ---- computations -----------------------------------------------------
    def loss(self, logits, targets, dtype="float64", native=True, **opts):
        import xseqloss
        x, t, kw = self.convert_args(logits, targets, dtype, opts, native)
        return xseqloss.sequence_cross_entropy(x, t, **kw)

    def loss_and_grad(self, logits, targets, dtype="float64", native=True, **opts):
        """(output, d sum(output) / d logits), both framework values."""
        import xseqloss
        x, t, kw = self.convert_args(logits, targets, dtype, opts, native)
        return self._vjp(lambda z: xseqloss.sequence_cross_entropy(z, t, **kw), x, t, kw)

    def _vjp(self, fn, x, t, kw):
        raise NotImplementedError

    def __repr__(self):
        return f"<Backend {self.name}>"


class NumpyBackend(Backend):
    name = "numpy"
    supports = ("float16", "float32", "float64")

    def array(self, x, dtype=None):
        x = np.asarray(x)
        return x if dtype is None else x.astype(np_dtype(dtype))

    def to_numpy(self, x):
        x = np.asarray(x)
        if x.dtype.kind == "f" or x.dtype == np_dtype("bfloat16"):
            return x.astype(np.float64)
        return x

    def dtype_name(self, x):
        return str(np.asarray(x).dtype)

    def is_native(self, x):
        return isinstance(x, (np.ndarray, np.generic))

    def _vjp(self, fn, x, t, kw):
        import xseqloss
        return xseqloss.value_and_grad(x, t, **kw)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self):
        import torch
        self.torch = torch

    def _dt(self, name):
        return getattr(self.torch, name)

    def array(self, x, dtype=None):
        x = np.asarray(x)
        if x.dtype == np_dtype("bfloat16"):
            return self.torch.tensor(x.astype(np.float32)).to(self.torch.bfloat16)
        t = self.torch.tensor(x)
        return t if dtype is None else t.to(self._dt(dtype))

    def to_numpy(self, x):
        x = x.detach()
        if x.is_floating_point():
            return x.to(self.torch.float64).cpu().numpy()
        return x.cpu().numpy()

    def dtype_name(self, x):
        return str(x.dtype).replace("torch.", "")

    def is_native(self, x):
        return isinstance(x, self.torch.Tensor)

    def _vjp(self, fn, x, t, kw):
        x = x.clone().requires_grad_(True)
        out = fn(x)
        out.sum().backward()
        g = x.grad if x.grad is not None else self.torch.zeros_like(x)
        return out.detach(), g


class TFBackend(Backend):
    name = "tensorflow"

    def __init__(self):
        import tensorflow as tf
        self.tf = tf

    def array(self, x, dtype=None):
        x = np.asarray(x)
        if x.dtype == np_dtype("bfloat16"):
            t = self.tf.cast(self.tf.constant(x.astype(np.float32)), self.tf.bfloat16)
        else:
            t = self.tf.constant(x)
        return t if dtype is None else self.tf.cast(t, dtype)

    def to_numpy(self, x):
        tf = self.tf
        if x.dtype.is_floating:
            return tf.cast(x, tf.float64).numpy()
        return x.numpy()

    def dtype_name(self, x):
        return x.dtype.name

    def is_native(self, x):
        return isinstance(x, (self.tf.Tensor, self.tf.Variable))

    def _vjp(self, fn, x, t, kw):
        tf = self.tf
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = fn(x)
            s = tf.reduce_sum(out)
        g = tape.gradient(s, x)
        if g is None:
            g = tf.zeros_like(x)
        return out, g


class JaxBackend(Backend):
    name = "jax"

    def __init__(self):
        import jax
        import jax.numpy as jnp
        self.jax = jax
        self.jnp = jnp

    def array(self, x, dtype=None):
        x = np.asarray(x)
        t = self.jnp.asarray(x)
        return t if dtype is None else t.astype(np_dtype(dtype))

    def to_numpy(self, x):
        x = np.asarray(x)
        if x.dtype.kind == "f" or x.dtype == np_dtype("bfloat16"):
            return x.astype(np.float64)
        return x

    def dtype_name(self, x):
        return str(x.dtype)

    def is_native(self, x):
        return isinstance(x, self.jax.Array)

    def _vjp(self, fn, x, t, kw):
        out, vjp = self.jax.vjp(fn, x)
        (g,) = vjp(self.jnp.ones_like(out))
        return out, g


_BACKEND_CLASSES = {"numpy": NumpyBackend, "torch": TorchBackend,
                    "tensorflow": TFBackend, "jax": JaxBackend}
_INSTANCES = {}


def get_backend(name):
    require_or_skip(name)
    if name not in _INSTANCES:
        _INSTANCES[name] = _BACKEND_CLASSES[name]()
    return _INSTANCES[name]

