"""Root pytest configuration: with --doctest-modules every module of the package is imported.

A module of a framework that is not installed is left out of collection locally, unless
XSEQLOSS_REQUIRE_BACKENDS asks for that framework (CI sets it to "all"): then the import error
stands, because in CI a missing framework is an error, never a skip.
"""

import importlib.util
import os

_REQUIRED = {s.strip() for s in os.environ.get("XSEQLOSS_REQUIRE_BACKENDS", "").split(",") if s.strip()}

_NEEDS = {
    "xseqloss/backends/torch": "torch",
    "xseqloss/torch.py": "torch",
    "xseqloss/backends/tensorflow": "tensorflow",
    "xseqloss/backends/jax": "jax",
    "xseqloss/keras.py": "keras",
    "xseqloss/hf.py": "torch",
    "docs/integrations.md": ("torch", "transformers", "accelerate"),  # its doctests: a Trainer run
    "xseqloss/backends/torch/_triton_kernels.py": "triton",
}

collect_ignore = [
    path for path, needs in _NEEDS.items()
    for module in [next((m for m in ((needs,) if isinstance(needs, str) else needs)
                         if importlib.util.find_spec(m) is None), None)]
    if module is not None and not ({"all", module} & _REQUIRED)
]
