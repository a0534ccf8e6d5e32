"""TensorFlow's C++ start-up lines (oneDNN, absl) on the command line: TensorFlow writes them to
file descriptor 2 while it is imported, before TF_CPP_MIN_LOG_LEVEL is read, so no environment
variable hides them (tested with TensorFlow 2.21). ``xseqloss info`` / ``conformance`` /
``crosscheck`` import it with descriptor 2 pointed at /dev/null, unless the user set
TF_CPP_MIN_LOG_LEVEL themselves (then they asked for TensorFlow's own logging rules)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from typing import Iterator

ENV = "XSEQLOSS_QUIET_TENSORFLOW"  # set for the suite's child processes, which import it themselves


@contextlib.contextmanager
def _fd2_to_devnull() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def tensorflow_quietly() -> None:
    """Import TensorFlow now, without its start-up lines, if it is installed and the user did not
    choose TensorFlow's logging themselves; also for child processes (``ENV``)."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ and os.environ.get(ENV) != "1":
        return
    os.environ[ENV] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # and its later run-time lines (a float16 note)
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    with _fd2_to_devnull():
        import tensorflow  # noqa: F401
