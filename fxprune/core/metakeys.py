"""Names of the entries fxprune keeps in ``node.meta`` and ``GraphModule.meta``.

One place for the keys that passes hand each other through a graph, so a reader can find every
writer and reader of an entry with one search.
"""

TENSOR_META = "tensor_meta"
"""``node.meta``: torch's ``TensorMetadata`` of the node's output, written by the shapes pass."""

FLOPS = "fxprune_flops"
"""``node.meta``: FLOPs that ``FlopCounterMode`` counted for the node (shapes pass)."""

MACS = "fxprune_macs"
"""``node.meta``: the node's MACs after pruning (annotate pass)."""

VALUE = "fxprune_value"
"""``node.meta``: the node's value when it is not a tensor (a size, a dtype), for the coupling pass."""

OPAQUE = "fxprune_opaque"
"""``GraphModule.meta``: modules the capture pass kept as leaves because they do not trace."""

CAPTURE = "fxprune_capture"
"""``GraphModule.meta``: how the model was captured (symbolic_trace, torch.export ...)."""

RECORD = "fxprune"
"""``GraphModule.meta``: the result's record (report, plan, strategy, verification, provenance)."""

TREE = "fxprune_tree"
"""``GraphModule.meta``: the module tree whose one run the graph records (the ops-run capture); results
are pruned copies of it."""

HF = "fxprune_hf"
"""``GraphModule.meta``: the Hugging Face model the graph was captured from; results are models of its class
when a config can describe their widths (``results/hfmodel.py``)."""
