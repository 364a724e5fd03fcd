"""FLOPs of a pruned model without running it.

Every contracting node (conv, linear, matmul) costs ``macs * prod(kept_i / size_i)`` over the pruned
dimensions it touches (its FlopTerm); everything the shapes pass counted elsewhere is constant. Because
a conv's MACs are (output positions) x numel(weight), this is exact: the tests check it against
``torch.utils.flop_counter.FlopCounterMode`` run on the pruned model.

``counter()`` is the FlopCounterMode every count in fxprune uses: it also counts the fused attention
kernels that FlopCounterMode has no formula for on CPU (``scaled_dot_product_attention``'s CPU flash
kernel and ``nn.MultiheadAttention``'s inference fast path), as the matmuls they stand for.
"""

from __future__ import annotations

import math
import warnings

from typing import TYPE_CHECKING

import torch
import torch.fx

from . import metakeys as keys
from .groups import NEVER_REMOVED, DependencyGraph
from .masks import distinct, owned_cat, unique

if TYPE_CHECKING:
    from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopModel", "total_macs", "counter"]


def _attention_flops(query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...], *args: object, **kwargs: object) -> int:
    """softmax(q @ k^T) @ v: two batched matmuls, (L x E)(E x S) and (L x S)(S x Ev) per batch entry."""
    *batch, length, e = query_shape
    return 2 * math.prod(batch) * length * key_shape[-2] * (e + value_shape[-1])


def _multi_head_attention_flops(query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...], embed_dim: int,
                                num_heads: int, *args: object, **kwargs: object) -> int:
    """The q, k, v and output projections plus the attention matmuls of all heads (batch-first inputs)."""
    tokens_q, tokens_kv = math.prod(query_shape[:-1]), math.prod(key_shape[:-1])
    projections = 2 * embed_dim * (2 * tokens_q * embed_dim + tokens_kv * (key_shape[-1] + value_shape[-1]))
    return projections + _attention_flops(query_shape, key_shape, (*value_shape[:-1], embed_dim))


_FUSED_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._native_multi_head_attention: _multi_head_attention_flops,
}


def counter() -> FlopCounterMode:
    """A FlopCounterMode (not displayed) that also counts fused attention kernels. Its module is imported here,
    not with fxprune: it imports triton where installed (a tenth of a second that only counting needs)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=_FUSED_ATTENTION)


def total_macs(gm: torch.fx.GraphModule) -> int:
    """MACs the shapes pass recorded for the whole graph (FlopCounterMode FLOPs / 2)."""
    return sum(int(n.meta.get(keys.FLOPS, 0)) for n in gm.graph.nodes) // 2


class FlopModel:
    """MACs as a function of the removed-atom mask, vectorized for the target search."""

    def __init__(self, deps: DependencyGraph, total: int) -> None:
        self.deps = deps
        self.total = total
        self.terms = deps.flop_terms
        self.constant = total - sum(t.macs for t in self.terms)
        factors = [(i, f) for i, t in enumerate(self.terms) for f in t.factors]
        self.sizes = torch.tensor([f.numel() for _, f in factors], dtype=torch.float64)
        self.term_of = torch.tensor([i for i, _ in factors], dtype=torch.long)
        self.macs_vec = torch.tensor([t.macs for t in self.terms], dtype=torch.float64)
        # (vector, atom, count) entries: how many indices of each distinct atom vector belong to each atom;
        # factors share vectors (a conv's output channels are the next one's input channels).
        vectors, vector_of = distinct([f for _, f in factors])
        self.vector_of = torch.tensor(vector_of, dtype=torch.long)
        self.vector_sizes = torch.tensor([v.numel() for v in vectors], dtype=torch.float64)
        rows, cols = owned_cat(vectors)
        keep = cols != NEVER_REMOVED
        width = max(deps.num_atoms, 1)
        key, counts = unique(rows[keep] * width + cols[keep], return_counts=True)
        self.rows, self.cols, self.counts = key // width, key % width, counts.to(torch.float64)
        # The same entries as a sparse (vector x atom) matrix, rows in order: one product counts the removed
        # indices of every vector (a fifth of the time of an index_add over the entries).
        ends = torch.bincount(self.rows, minlength=len(vectors)).cumsum(0)
        with warnings.catch_warnings():  # torch says CSR support is in beta; a matrix-vector product is all this needs
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            self.matrix = torch.sparse_csr_tensor(torch.cat([torch.zeros(1, dtype=torch.long), ends]), self.cols, self.counts,
                                                  (len(vectors), width), check_invariants=True)

    def kept_per_factor(self, removed: torch.Tensor) -> torch.Tensor:
        """How many indices of each factor of each term stay after removing ``removed`` (float64)."""
        return (self.vector_sizes - torch.mv(self.matrix, removed.to(torch.float64)))[self.vector_of]

    def macs(self, removed: torch.Tensor) -> float:
        """MACs (float64) after removing ``removed``, for the target search."""
        if not self.terms:
            return float(self.constant)
        kept = self.kept_per_factor(removed)
        ratio = torch.ones(len(self.terms), dtype=torch.float64).scatter_reduce(0, self.term_of, kept / self.sizes, "prod")
        return float((self.macs_vec * ratio).sum()) + self.constant

    cost = macs  # the cost-model interface that select uses

    def describe(self, value: float) -> str:
        return f"{2 * value / 1e9:.4g} GFLOPs"

    def reached(self, smallest: float) -> dict[str, float]:
        return {"smallest_gflops": 2 * smallest / 1e9}

    def saved_per_atom(self) -> torch.Tensor:
        """MACs that removing each atom alone would save from the unpruned model (float64, per atom).

        Only the terms an atom appears in change: each loses ``1 - prod_f (1 - count_f / size_f)`` of
        its MACs over the factors ``f`` that hold the atom.
        """
        width = max(self.deps.num_atoms, 1)
        saved = torch.zeros(self.deps.num_atoms, dtype=torch.float64)
        if not self.terms:
            return saved
        # Each factor's (atom, count) entries are its vector's, which are contiguous in rows.
        spans = torch.split(torch.arange(self.rows.numel()), torch.bincount(self.rows, minlength=len(self.vector_sizes)).tolist())
        factor, entry = owned_cat([spans[v] for v in self.vector_of.tolist()])
        key, inverse = unique(self.term_of[factor] * width + self.cols[entry], return_inverse=True)
        left = 1 - self.counts[entry] / self.sizes[factor]
        kept = torch.ones(key.numel(), dtype=torch.float64).scatter_reduce(0, inverse, left, "prod")
        return saved.index_add(0, key % width, self.macs_vec[key // width] * (1 - kept))

    def per_node(self, removed: torch.Tensor) -> dict[str, int]:
        """Exact integer MACs of every FlopTerm node (the sum of its terms) after removing ``removed``
        (``kept_per_factor``'s counts are whole numbers far below float64's 2**53)."""
        kept = iter(self.kept_per_factor(removed).tolist())
        out: dict[str, int] = {}
        for t in self.terms:
            num = math.prod(int(next(kept)) for _ in t.factors)
            den = math.prod(f.numel() for f in t.factors)
            out[t.node] = out.get(t.node, 0) + t.macs * num // den
        return out

    def exact(self, per_node: dict[str, int]) -> int:
        """Exact integer MACs of the whole model, given ``per_node``'s figures for a removed mask."""
        return self.constant + sum(per_node.values())
