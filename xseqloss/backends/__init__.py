"""One package per framework (numpy, torch, tensorflow, jax), each a ``Backend`` (plan/ops.py)
composed from its parts: native kernels along the framework's own class axis, its array ops, its
compiled or in-place tricks, its collectives. The semantics live in ``xseqloss/core``; nothing here
decides which tokens count or how a reduction divides. Only ``xseqloss._dispatch`` imports these
packages."""
