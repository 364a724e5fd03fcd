"""fxprune passes: capture, shapes, couple, select, rewrite, annotate, verify."""
