"""The xseqloss conformance suite (API.md section 6).

It proves that every backend, on every device it reaches, computes the same
loss and gradient as an independent float64 reference (``reference.py``) and
as each framework's own loss where the semantics overlap (``natives.py``),
over a declarative case matrix (``cases.py``) and the bad-input catalogue
(``errors.py``).  Run it with ``xseqloss conformance`` or ``pytest conformance``.

Only relative imports are used inside the suite: it is also installed as
``xseqloss._conformance``.
"""

from .report import markdown, summary_table, text_summary, write_json, write_markdown
from .runner import failures, run

__all__ = ["run", "failures", "markdown", "summary_table", "text_summary", "write_json", "write_markdown"]
