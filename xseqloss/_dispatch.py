"""Backend selection: from the array's type (without importing frameworks), the default backend
(``set_backend``, ``use_backend``, ``XSEQLOSS_BACKEND``); the only module that imports the backend
packages (``load``).

einops-style: a backend is recognised only among frameworks already in ``sys.modules``, so
``import xseqloss`` and a NumPy call never import a framework.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator

from ._errors import XSeqLossError, XSeqLossTypeError
from .core.sides import _TYPE_NAME, convert_hint, framework_of

BACKENDS = ("numpy", "torch", "tensorflow", "jax")
_FRAMEWORK = {"numpy": "numpy", "torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}
_EXTRA = {"numpy": "xseqloss", "torch": "xseqloss[torch]", "tensorflow": "xseqloss[tensorflow]",
          "jax": "xseqloss[jax]"}
_ALIASES = {"tf": "tensorflow", "pytorch": "torch", "np": "numpy"}

# use_backend: per thread and per asyncio task (a ContextVar); set_backend: process-wide.
_context_default: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "xseqloss_default_backend", default=None)
_process_default: str | None = None
_loaded: dict[str, Any] = {}


def check_backend_name(name: Any, argument: str = "backend") -> str:
    if not isinstance(name, str):
        raise XSeqLossTypeError(f"{argument} must be a string, one of {list(BACKENDS)}; got {name!r}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in BACKENDS:
        raise XSeqLossError(f"{argument}={name!r} is not a backend; valid backends are {list(BACKENDS)}")
    return key


def load(name: str) -> Any:
    """The backend object for ``name``; imports its framework (an explicit request)."""
    name = check_backend_name(name)
    be = _loaded.get(name)
    if be is not None:
        return be
    # import statements, not importlib, and no lock of our own (Python's import lock makes the
    # import thread-safe): torch.compile(fullgraph=True) runs an import statement at trace time but
    # cannot trace importlib or a lock, so a first call under compile works too
    try:
        if name == "numpy":
            from .backends import numpy as module
        elif name == "torch":
            from .backends import torch as module
        elif name == "tensorflow":
            from .backends import tensorflow as module
        else:
            from .backends import jax as module
    except ImportError as exc:
        raise XSeqLossError(
            f"backend {name!r} needs {_FRAMEWORK[name]}, which could not be imported ({exc}); "
            f"install it with: pip install '{_EXTRA[name]}'") from exc
    return _loaded.setdefault(name, module.BACKEND)


def set_backend(name: str) -> None:
    """Set the process-wide default backend (used for NumPy arrays and Python values)."""
    global _process_default
    _process_default = check_backend_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Within the block, NumPy/Python inputs go to ``name``; per thread and per asyncio task."""
    token = _context_default.set(check_backend_name(name))
    try:
        yield _context_default.get()  # type: ignore[misc]
    finally:
        _context_default.reset(token)


def default_backend() -> str:
    name = _context_default.get() or _process_default
    if name:
        return name
    env = os.environ.get("XSEQLOSS_BACKEND")
    if env:
        return check_backend_name(env, "XSEQLOSS_BACKEND")
    return "numpy"


def resolve(logits: Any, backend: str | None) -> tuple[Any, Any]:
    """The backend for this call and the logits as that backend's array."""
    owner = framework_of(logits)
    if backend is not None:
        name = check_backend_name(backend)
        if owner is not None and owner != name:
            raise XSeqLossTypeError(
                f"logits are {_TYPE_NAME[owner]} but backend={name!r}: convert them first, e.g. "
                f"logits = {convert_hint(name, owner, 'logits')}, or drop backend= to use {owner!r}")
    else:
        name = owner or default_backend()
    be = load(name)
    return be, (logits if owner == name else be.convert(logits, "logits"))


def backend_part(name: str, part: str) -> Any:
    """One part (module) of a backend package, e.g. ("torch", "fused"): for the tests that check a
    part or plant a bug in it (``xseqloss.internals.part``)."""
    import importlib
    load(name)
    return importlib.import_module(f"{__package__}.backends.{check_backend_name(name)}.{part}")
