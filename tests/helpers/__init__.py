"""What the test modules share; none of it is a test itself.

* ``support``: the backend adapters (``get_backend``), tolerances, rounding and the
  XSEQLOSS_REQUIRE_BACKENDS rule (``require_or_skip``);
* ``reference64``: the tests' own float64 reference of ``sequence_cross_entropy`` and ``pool``
  (independent of the package and of conformance/reference.py);
* ``inputs``: layouts, reductions and random cases (``make_case``) for the option grids;
* ``compare``: one case on one backend against the reference (value, gradient, dtype, shape);
* ``spawn``: multi-process plumbing of tests/test_distributed.py and tests/test_class_parallel.py;
* scripts run in a fresh interpreter: ``keras_fit_script`` (tests/test_keras_loss.py) and
  ``triton_kernel_script`` (tests/test_triton_kernel.py; its float64
  reference is also tests/test_triton_cuda.py's); ``triton_runs`` runs that script in a
  subprocess, with the installed Triton or another one (tests/test_triton_newest.py).

Test modules import them as ``from helpers.support import ...`` (pytest puts tests/ on sys.path);
modules here import each other relatively.
"""
