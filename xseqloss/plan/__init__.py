"""Layer 1: plain data, no arrays and no frameworks: the options of a call (``options``), the
messages of the error catalogue (``messages``), the plan of one call (``call_plan``), which kernel
each backend runs (``engine``), the class split (``split``) and the backend contract (``ops``)."""
