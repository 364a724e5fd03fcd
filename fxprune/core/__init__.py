"""Core data and the helpers every pass may use: the dependency graph and its plan (``graph``), the
``meta`` keys passes hand over (``metakeys``), removed/kept masks, FX helpers, op tables, the FLOP
model, layers in data-flow order, the result's code generator, tracing shims for library models, the
width rule, and the decisions a detector's run takes on its data. Nothing here imports a pass."""
