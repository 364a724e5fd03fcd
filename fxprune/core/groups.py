"""The data the passes hand to each other: DependencyGraph, Group, Member, Plan, Patch, FlopTerm.

Vocabulary. A *channel* is one index along one dimension of one parameter (``layer1.0.conv1.weight``
dim 0, index 5). Channels that must be removed together (a residual add, a shuffle, a shared weight)
form one *atom*. Atoms that touch the same set of parameter dimensions form a *group*; a group's width
is its number of atoms, and a plan keeps a subset of each group's atoms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from tabulate import tabulate

if TYPE_CHECKING:
    import networkx as nx

    from .masks import Layout

__all__ = ["Member", "Group", "Patch", "FlopTerm", "DependencyGraph", "Plan", "Role", "PatchKind", "Family", "NEVER_REMOVED"]

NEVER_REMOVED = -1
"""Atom id of a channel that no plan can remove (a model input's channel, say)."""


class Role(str, Enum):
    """What a member's dimension does with its group's channels."""

    OUT = "out"  # produces them (conv / linear output channels)
    IN = "in"  # reads them (a contraction's input channels)
    PARAM = "param"  # holds per-channel state (norm affine and running statistics, PReLU)


class PatchKind(str, Enum):
    """How a literal follows a pruned size; see ``Patch``."""

    ATTR = "attr"
    ARG = "arg"
    SLICE = "slice"
    SPLIT = "split"
    VALUE = "value"


class Family(str, Enum):
    """The op family a graph node belongs to, which decides how channels flow through it."""

    CONTRACT = "contract"
    ELEMENTWISE = "elementwise"
    CHANNELWISE = "channelwise"
    SHAPE = "shape"
    NORM = "norm"
    REDUCTION = "reduction"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Member:
    """One dimension of one parameter or buffer that a group's atoms index into."""

    name: str  # qualified parameter/buffer name, e.g. "layer1.0.conv1.weight"
    dim: int
    module: str  # owning module (or graph node for functional use)
    role: Role

    def __str__(self) -> str:
        return f"{self.name}[{self.dim}]"


@dataclass
class Group:
    """Atoms with the same members; ``DependencyGraph.member_atoms`` maps each member's indices to atoms."""

    id: int
    atoms: torch.Tensor  # global atom ids, in channel order
    members: tuple[Member, ...]
    frozen: tuple[str, ...] = ()  # reasons; empty means prunable

    @cached_property
    def width(self) -> int:  # read thousands of times a compile by the selection pass; atoms never change
        return int(self.atoms.numel())

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.width > 1

    @property
    def status(self) -> str:
        """"prunable", "frozen: <reasons>", or "one atom" (a group of one atom is kept: nothing to choose)."""
        return "prunable" if self.prunable else ("frozen: " + "; ".join(self.frozen) if self.frozen else "one atom")


@dataclass(frozen=True)
class Patch:
    """A literal in the graph or a module attribute that must follow a pruned size.

    kind "attr": module ``target``'s attribute ``field`` becomes the pruned size of ``node`` along
    ``dim`` (wrapped in a tuple when ``as_tuple``). kind "arg": the literal at ``path`` inside node
    ``target``'s (args, kwargs) becomes that size. kind "slice": the slice at ``path`` is re-indexed to
    the kept positions of ``node`` along ``dim``. kind "split": node ``target`` becomes a split with the
    pruned sizes of its pieces along ``dim``. kind "value": the argument at ``path`` becomes ``value``, what
    the original computed from a size that pruning changes (scaled dot-product attention's default scale).
    """

    kind: PatchKind
    target: str
    node: str
    dim: int
    field: str = ""
    path: tuple[Any, ...] = ()
    as_tuple: bool = False
    value: Any = None


@dataclass(frozen=True)
class FlopTerm:
    """MACs of one graph node: ``macs * prod(kept_i / size_i)`` over its prunable factors.

    Each factor is an atom-id vector (``NEVER_REMOVED`` for channels no plan removes) along one pruned
    dimension.
    """

    node: str
    macs: int
    factors: tuple[torch.Tensor, ...]


@dataclass
class DependencyGraph:
    """Channel coupling of a captured model: groups, per-tensor channel atoms, patches, FLOP terms."""

    groups: list[Group]
    member_atoms: dict[tuple[str, int], torch.Tensor]  # (param name, dim) -> atom id per index
    members: dict[tuple[str, int], Member]
    tensor_atoms: dict[str, tuple[int, torch.Tensor]]  # node name -> (dim, atom id per index)
    patches: list[Patch]
    flop_terms: list[FlopTerm]
    # (node, arg index (or (list arg, item) for einsum's list form), dim) read channel-wise by a contraction
    consumers: list[tuple[str, int | tuple[int, int], int]]
    notes: dict[str, str]  # node name -> why pruning there is not exactly output-preserving (for the user)
    families: dict[str, Family]  # node name -> op family
    num_atoms: int
    opaque: tuple[str, ...] = ()
    atom_group: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    # Norm nodes (LayerNorm, GroupNorm) whose statistics span pruned channels: verification recomputes
    # their statistics over the kept channels only.
    masked_norms: tuple[str, ...] = ()
    # The last plan ``masks.removed_mask`` was asked for (a copy of its keep) and its mask.
    last_removed: tuple[dict[int, list[int]], torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @cached_property
    def member_layout(self) -> Layout:
        """``masks.Layout`` of ``member_atoms``."""
        from .masks import Layout  # masks reads this module's types

        return Layout(self.member_atoms)

    @cached_property
    def tensor_layout(self) -> Layout:
        """``masks.Layout`` of the atoms of ``tensor_atoms`` (by node name)."""
        from .masks import Layout

        return Layout({name: atoms for name, (_, atoms) in self.tensor_atoms.items()})

    @cached_property
    def atom_kinds(self) -> dict[int, tuple[int, bool]]:
        """Group id -> (channels per atom, whether its atoms repeat): ``masks.atom_kinds``."""
        from .masks import atom_kinds

        return atom_kinds(self)

    @cached_property
    def fragile_atoms(self) -> list[torch.Tensor]:
        """The atoms of each tensor a plan could empty: ``masks.fragile_atoms``."""
        from .masks import fragile_atoms

        return fragile_atoms(self)

    def groups_of(self, module: str) -> list[Group]:
        """Groups that touch any parameter of ``module`` (a qualified module name)."""
        prefix = module + "."
        return [g for g in self.groups if any(m.name.startswith(prefix) for m in g.members)]

    def channels(self, group: Group) -> int:
        """Channels ``group`` stands for, which its width in atoms may not show: a model input is one frozen
        atom, and an atom of a grouped conv is one position in each of its groups. Counted in the members
        that own the channels (output and per-channel dims); a group with none (a model input) counts the
        fewest that any reader (a contraction's input dim) takes from it."""
        counts = {role: [] for role in Role}  # type: dict[Role, list[int]]
        for m in group.members:
            counts[m.role].append(int(torch.isin(self.member_atoms[(m.name, m.dim)], group.atoms).sum()))
        owned = counts[Role.OUT] + counts[Role.PARAM]
        return max(owned) if owned else min(counts[Role.IN], default=group.width)

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def to_networkx(self) -> nx.Graph:
        """Bipartite graph: ``("group", id)`` nodes joined to ``("member", "param[dim]")`` nodes."""
        import networkx as nx  # a twelfth of a second, for this alone

        g = nx.Graph()
        for grp in self.groups:
            g.add_node(("group", grp.id), kind="group", width=grp.width, frozen=list(grp.frozen))
            for m in grp.members:
                g.add_node(("member", str(m)), kind="member", module=m.module, role=m.role)
                g.add_edge(("group", grp.id), ("member", str(m)))
        return g

    def to_dot(self) -> str:
        """Graphviz DOT text of :meth:`to_networkx`: groups as boxes (frozen ones grey), members as ellipses."""
        lines = ["graph fxprune {", "  rankdir=LR;"]
        for grp in self.groups:
            label = f"group {grp.id}\\nwidth {grp.width}"
            style = 'style=filled fillcolor="#dddddd"' if grp.frozen else 'style=filled fillcolor="#cfe8ff"'
            if grp.frozen:
                label += "\\nfrozen: " + grp.frozen[0].replace('"', "'")
            lines.append(f'  "g{grp.id}" [shape=box {style} label="{label}"];')
        seen: set[str] = set()
        for grp in self.groups:
            for m in grp.members:
                if str(m) not in seen:
                    seen.add(str(m))
                    lines.append(f'  "{m}" [label="{m}\\n({m.role})"];')
                lines.append(f'  "g{grp.id}" -- "{m}";')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def table(self, max_members: int = 4) -> str:
        rows = []
        for grp in self.groups:
            names = [str(m) for m in grp.members]
            shown = ", ".join(names[:max_members]) + (f", ... (+{len(names) - max_members})" if len(names) > max_members else "")
            channels = self.channels(grp)
            width = channels if channels == grp.width else f"{channels} ({grp.width} atom{'s' * (grp.width != 1)})"
            rows.append([grp.id, width, len(names), grp.status, shown])
        return tabulate(rows, headers=["group", "channels", "members", "status", "first members"])

    def __str__(self) -> str:
        n = len(self.prunable_groups)
        return f"DependencyGraph: {len(self.groups)} groups, {n} prunable\n" + self.table()


@dataclass
class Plan:
    """For each group id, the positions (0..width-1, Python ints) of the atoms to keep. Groups not listed keep all."""

    keep: dict[int, list[int]]

    def to_dict(self) -> dict[str, list[int]]:
        """What ``to_json`` writes, as the dict: group ids (as strings, in order) -> kept positions."""
        return {str(k): list(v) for k, v in sorted(self.keep.items())}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls({int(k): [int(i) for i in v] for k, v in json.loads(text).items()})
