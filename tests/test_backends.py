"""Backend selection (API.md "Backends"): from the logits' type without
importing frameworks, set_backend, use_backend (per thread and per asyncio
task), XSEQLOSS_BACKEND, backend=, available_backends(), the not-installed
error, and JAX without x64.  Subprocess tests start a fresh interpreter.
Also the kernel of each backend (xseqloss.internals.engine, XSEQLOSS_<BACKEND>_KERNEL) and the
tests' own backend adapters (tests/helpers/support.py)."""

import asyncio
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from helpers.support import ALL_BACKENDS, _framework_error, get_backend, require_or_skip

import xseqloss as xsl
from xseqloss.internals import engine as _engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
FRAMEWORK_MODULES = ("torch", "tensorflow", "jax", "jaxlib", "keras")


def run_python(code, env=None, timeout=240):
    full_env = dict(os.environ)
    full_env.pop("XSEQLOSS_BACKEND", None)
    full_env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS])
    full_env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


def small():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, 3, 4)), rng.integers(0, 4, size=(2, 3))


@pytest.fixture
def restore_default(xsl):
    yield
    xsl.set_backend("numpy")


# ------------------------------------------------------------------ imports

def test_import_and_numpy_use_import_no_framework():
    out = run_python(f"""
        import sys
        import numpy as np
        import xseqloss as xsl
        heavy = {FRAMEWORK_MODULES!r}
        assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
        x = np.random.default_rng(0).normal(size=(2, 3, 4))
        y = np.array([[0, 1, 2], [3, 0, -100]])
        out = xsl.sequence_cross_entropy(x, y, mask=np.ones((2, 3), bool), label_smoothing=0.1)
        v, g = xsl.value_and_grad(x, y, reduction="none")
        n = xsl.token_count(y, layout="NTC")
        p = xsl.pool(x, layout="NTH", lengths=np.array([1, 3]))
        with xsl.use_backend("numpy"):
            xsl.sequence_cross_entropy(x, y)
        assert isinstance(out, (np.ndarray, np.generic)) and isinstance(g, np.ndarray)
        loaded = [m for m in heavy if m in sys.modules]
        assert not loaded, loaded
        print("clean")
    """)
    assert "clean" in out


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_framework_input_imports_no_other_framework(framework):
    require_or_skip(framework)
    make = {"torch": "import torch\nx = torch.zeros(2, 3, 4)\ny = torch.zeros(2, 3, dtype=torch.long)",
            "jax": "import jax.numpy as jnp\nx = jnp.zeros((2, 3, 4))\ny = jnp.zeros((2, 3), jnp.int32)"}
    others = [m for m in ("torch", "tensorflow", "jax", "keras") if m != framework]
    out = run_python(make[framework] + f"""
import sys
import xseqloss as xsl
out = xsl.sequence_cross_entropy(x, y)
print(type(out).__module__)
loaded = [m for m in {others!r} if m in sys.modules]
assert not loaded, loaded
print("clean")
""")
    assert "clean" in out and framework in out.split()[0]


# --------------------------------------------------------- default backend

def test_numpy_is_the_default(xsl):
    x, y = small()
    assert isinstance(xsl.sequence_cross_entropy(x, y), (np.ndarray, np.generic))


def test_set_backend(backend, xsl, restore_default):
    x, y = small()
    xsl.set_backend(backend.name)
    out = xsl.sequence_cross_entropy(x, y, reduction="none")
    assert backend.is_native(out)
    # framework inputs keep their own backend whatever the default
    if backend.name != "numpy":
        xsl.set_backend("numpy")
        assert backend.is_native(xsl.sequence_cross_entropy(backend.array(x), backend.array(y)))


def test_set_backend_unknown(xsl):
    with pytest.raises(xsl.XSeqLossError, match="mxnet"):
        xsl.set_backend("mxnet")
    with pytest.raises(xsl.XSeqLossError, match="mxnet"):
        with xsl.use_backend("mxnet"):
            pass


def test_use_backend_context(backend, xsl):
    x, y = small()
    with xsl.use_backend(backend.name):
        assert backend.is_native(xsl.sequence_cross_entropy(x, y))
        with xsl.use_backend("numpy"):
            assert isinstance(xsl.sequence_cross_entropy(x, y), (np.ndarray, np.generic))
        assert backend.is_native(xsl.sequence_cross_entropy(x, y))
    assert isinstance(xsl.sequence_cross_entropy(x, y), (np.ndarray, np.generic))
    with pytest.raises(RuntimeError):
        with xsl.use_backend(backend.name):
            raise RuntimeError("boom")
    assert isinstance(xsl.sequence_cross_entropy(x, y), (np.ndarray, np.generic))


def _other_than_numpy():
    for name in ("torch", "jax", "tensorflow"):
        if _framework_error(name) is None:
            return get_backend(name)
    require_or_skip("torch")


def test_use_backend_is_per_thread(xsl):
    other = _other_than_numpy()
    x, y = small()
    inside, outside = threading.Event(), threading.Event()
    results = {}

    def worker_with_context():
        with xsl.use_backend(other.name):
            inside.set()
            outside.wait(30)  # the other thread computes while we are inside
            results["inside"] = xsl.sequence_cross_entropy(x, y)

    def worker_plain():
        inside.wait(30)
        results["plain"] = xsl.sequence_cross_entropy(x, y)
        outside.set()

    threads = [threading.Thread(target=worker_with_context), threading.Thread(target=worker_plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert other.is_native(results["inside"])
    assert isinstance(results["plain"], (np.ndarray, np.generic))


def test_use_backend_is_per_async_task(xsl):
    other = _other_than_numpy()
    x, y = small()

    async def main():
        entered = asyncio.Event()
        release = asyncio.Event()

        async def with_context():
            with xsl.use_backend(other.name):
                entered.set()
                await release.wait()
                return xsl.sequence_cross_entropy(x, y)

        async def plain():
            await entered.wait()
            r = xsl.sequence_cross_entropy(x, y)
            release.set()
            return r

        return await asyncio.gather(with_context(), plain())

    inside, plain = asyncio.run(main())
    assert other.is_native(inside)
    assert isinstance(plain, (np.ndarray, np.generic))


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_env_var_subprocess(framework):
    require_or_skip(framework)
    out = run_python("""
        import numpy as np
        import xseqloss as xsl
        out = xsl.sequence_cross_entropy(np.zeros((2, 3, 4)), np.zeros((2, 3), np.int64))
        print(type(out).__module__)
    """, env={"XSEQLOSS_BACKEND": framework})
    assert out.strip().startswith(framework)


def test_explicit_backend_beats_default(backend, xsl, restore_default):
    x, y = small()
    xsl.set_backend("numpy")
    assert backend.is_native(xsl.sequence_cross_entropy(x, y, backend=backend.name))


# ----------------------------------------------------------- availability

def test_available_backends(xsl):
    found = xsl.available_backends()
    text = repr(found)
    for name in ALL_BACKENDS:
        if _framework_error(name) is None:
            mod = __import__(name)
            assert name in found, f"{name} missing from {text}"
            assert mod.__version__ in text, f"{name} {mod.__version__} not in {text}"
    assert "cpu" in text.lower(), f"no device listed: {text}"


def test_not_installed_framework_names_pip_extra():
    out = run_python("""
        import sys
        for m in ("torch", "tensorflow", "jax"):
            sys.modules[m] = None        # import m now raises ImportError
        import numpy as np
        import xseqloss as xsl
        x, y = np.zeros((1, 2, 3)), np.zeros((1, 2), np.int64)
        for name in ("torch", "tensorflow", "jax"):
            try:
                xsl.sequence_cross_entropy(x, y, backend=name)
            except xsl.XSeqLossError as e:
                msg = str(e)
                assert "pip install" in msg and f"xseqloss[{name}]" in msg, msg
            else:
                raise AssertionError(f"no error for missing {name}")
            try:
                xsl.set_backend(name)
                xsl.sequence_cross_entropy(x, y)
            except xsl.XSeqLossError as e:
                assert f"xseqloss[{name}]" in str(e), str(e)
            else:
                raise AssertionError(f"set_backend({name!r}) with {name} missing: no error")
            finally:
                xsl.set_backend("numpy")
        avail = xsl.available_backends()
        assert set(avail) == {"numpy"}, avail
        print("ok")
    """)
    assert "ok" in out


# -------------------------------------------------------- JAX without x64

def test_jax_without_x64_float32_works():
    require_or_skip("jax")
    out = run_python("""
        import jax, jax.numpy as jnp, numpy as np
        assert not jax.config.jax_enable_x64
        import xseqloss as xsl
        from helpers.reference64 import reference
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2, 3, 5)).astype(np.float32)
        y = rng.integers(0, 5, size=(2, 3))
        m = np.array([[1, 1, 0], [1, 0, 1]], bool)
        ref, gref = reference(x.astype(np.float64), y, mask=m, label_smoothing=0.1,
                              with_grad=True)
        f = lambda z: xsl.sequence_cross_entropy(z, jnp.asarray(y), mask=jnp.asarray(m),
                                                 label_smoothing=0.1)
        out = f(jnp.asarray(x))
        assert out.dtype == jnp.float32, out.dtype
        assert abs(float(out) - ref) / (1 + abs(ref)) < 1e-5, (float(out), ref)
        g = jax.grad(f)(jnp.asarray(x))
        assert g.dtype == jnp.float32
        assert np.max(np.abs(np.asarray(g, np.float64) - gref)) < 1e-5
        assert abs(float(jax.jit(f)(jnp.asarray(x))) - ref) < 1e-5
        # float64 NumPy input with backend="jax": float32 (JAX's own rule)
        o64 = xsl.sequence_cross_entropy(x.astype(np.float64), y, backend="jax")
        assert o64.dtype == jnp.float32, o64.dtype
        # int64 targets that do not fit int32 raise instead of truncating
        big = y.astype(np.int64)
        big[0, 0] = 2**32 + 1
        try:
            xsl.sequence_cross_entropy(x, big, backend="jax")
        except xsl.XSeqLossError as e:
            assert "targets" in str(e), str(e)
        else:
            raise AssertionError("int64 target 2**32+1 was accepted without x64")
        print("ok")
    """, env={"JAX_ENABLE_X64": "0"})
    assert "ok" in out


# -------------------------------------------------------- kernel selection (issue 11)

def test_backend_objects_exist_for_every_kernel():
    for name in ("numpy", "torch", "tensorflow", "jax"):
        assert "auto" in _engine.KERNELS[name] and "native" in _engine.KERNELS[name]
    with pytest.raises(xsl.XSeqLossError, match="valid kernels are"):
        with _engine.use("torch", "cuda-magic"):
            pass


def test_environment_selects_the_kernel(monkeypatch):
    monkeypatch.setenv("XSEQLOSS_NUMPY_KERNEL", "chunked")
    assert _engine.current("numpy").kernel == "chunked"
    monkeypatch.setenv("XSEQLOSS_NUMPY_KERNEL", "bogus")
    with pytest.raises(xsl.XSeqLossError, match=r"XSEQLOSS_NUMPY_KERNEL='bogus' is not a numpy kernel"):
        xsl.sequence_cross_entropy(np.zeros((1, 2, 3)), np.array([[0, 1]]))


# ------------------------------------------- the tests' own adapters (helpers/support.py)

def test_get_backend_is_importable():
    assert get_backend("numpy").name == "numpy"


def test_get_backend_round_trip():
    assert get_backend("numpy").name == "numpy"
