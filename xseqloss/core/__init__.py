"""Layer 2: the semantics, written once over the backend contract (plan/ops.py): which tokens count
(``tokens``), the per-token loss and its gradient (``token_loss``), reductions and denominators
(``reduction``), the whole loss (``compute``), the value checks as arrays (``checks``), the chunk
helpers and the fused layer's loop (``chunks``, ``linear``), the upstream rule (``backward``),
ragged rows (``ragged``), side arrays (``sides``) and generic kernels (``common``)."""
