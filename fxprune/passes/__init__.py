"""fxprune passes: capture, shapes, couple, rewrite, annotate, verify (the budget that selects is selection/budget.py)."""
