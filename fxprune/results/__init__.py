"""What a pruned result is built as when it is not the rewritten graph itself: a pruned copy of the user's
module tree (``transplant``), or a model of the user's Hugging Face class with a config that tells the
truth about its widths (``hfmodel``, ``hfconfig``)."""
