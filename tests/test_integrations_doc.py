"""docs/integrations.md runs: its ``>>>`` blocks are doctests (pytest's ``--doctest-glob=*.md``, a
three-step ``Trainer`` run with xseqloss.hf); its Flax NNX script needs 4 host devices, which
``XLA_FLAGS`` must give before JAX is imported, so it runs here in a fresh interpreter."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from helpers.spawn import env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "integrations.md")


def _text():
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def _scripts(text):
    """The ```python blocks that are scripts (not doctests)."""
    return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if not b.lstrip().startswith(">>>")]


def test_flax_nnx_example_on_4_host_devices(tmp_path):
    for name in ("jax", "flax", "optax"):
        if importlib.util.find_spec(name) is None:
            if os.environ.get("XSEQLOSS_REQUIRE_BACKENDS", "").strip().lower() == "all":
                pytest.fail(f"{name} is not installed but XSEQLOSS_REQUIRE_BACKENDS=all")
            pytest.skip(f"{name} not installed")
    (script,) = _scripts(_text())
    assert "nnx.jit" in script and 'weight_layout="HC"' in script and "sequence_cross_entropy" in script
    path = tmp_path / "flax_nnx_example.py"
    path.write_text(script)
    e = env()
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    e["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "flax nnx ok" in proc.stdout


def test_the_keras_workaround_is_gone_from_the_docs():
    """Building the compiled loss by hand before fit (model.compute_loss) is no longer needed."""
    for name in ("distributed.md", "integrations.md", "porting.md"):
        with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as f:
            assert "compute_loss(" not in f.read(), name
