"""Static errors that keep their type under ``torch.compile(fullgraph=True)``.

Dynamo traces ``raise`` symbolically and reports any exception a compiled frame does not catch as
``torch._dynamo.exc.Unsupported``, which hides the argument, the value and the valid range from
the user. Under compilation the error is raised again at trace time, by a function dynamo runs for
real (the torch backend's ``raise_at_trace_time``), as a subclass of the same class that dynamo
lets through unchanged (decisions.md item 23). Eager calls and other frameworks are untouched.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

from .. import _dispatch
from .._errors import XSeqLossError, XSeqLossTypeError

F = TypeVar("F", bound=Callable[..., Any])


def keep_type_when_compiled(fn: F) -> F:
    """A public function whose static errors keep their type under ``torch.compile(fullgraph=True)``."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (XSeqLossError, XSeqLossTypeError) as exc:
            torch = sys.modules.get("torch")
            if torch is not None and torch.compiler.is_compiling():
                _dispatch.load("torch").raise_at_trace_time(type(exc).__name__, exc.args[0] if exc.args else "")
            raise
    return wrapper  # type: ignore[return-value]


