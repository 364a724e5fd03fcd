"""Saved pruned models: the archive format (``serialize``) and the record of how a result was made (``record``)."""
