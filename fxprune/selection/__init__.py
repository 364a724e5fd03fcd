"""How channels are chosen: the ``Strategy`` (``strategy``), the selectors and their registry
(``selectors``, data-driven ones in ``datadriven``), activation statistics (``stats``) and the norm
layers' gradient scores (``normgrad``)."""
