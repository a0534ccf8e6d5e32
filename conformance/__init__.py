"""The xseqloss conformance suite (API.md section 6).

It proves that every backend, on every device it reaches, computes the same
loss and gradient as an independent float64 reference (``reference.py``) and
as each framework's own loss where the semantics overlap (``natives.py``),
over a declarative case matrix (``cases.py``) and the bad-input catalogue
(``errors.py``); ``distributed.py`` (with ``distributed_checks.py`` and ``distributed_workers.py``) runs a subset with the class axis split
over workers (torch gloo processes, JAX host devices; API.md 9.2).  Run it
with ``xseqloss conformance`` (``--distributed``: only the split subset) or
``pytest conformance``.

Only relative imports are used inside the suite: it is also installed as
``xseqloss._conformance``.
"""

from .distributed import distributed_report, merge, run_distributed
from .report import markdown, summary_table, text_summary, write_json, write_markdown
from .runner import failures, run

__all__ = ["run", "failures", "run_distributed", "distributed_report", "merge", "markdown", "summary_table",
           "text_summary", "write_json", "write_markdown"]
