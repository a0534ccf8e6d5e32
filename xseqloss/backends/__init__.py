"""One small module per framework: native kernels along the framework's own class axis and a few
array ops. The semantics live in ``xseqloss._loss``; nothing here decides which tokens count or how
a reduction divides."""
