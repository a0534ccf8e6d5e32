"""Layer 5: one prepared call: the static checks and the side arrays moved to the logits' framework
(``prepare``), the eager value checks' messages (``validate``), ragged inputs as users hold them
(``ragged``) and the compiled-error wrapper (``compiled``)."""
