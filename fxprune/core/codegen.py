"""Generated code that reaches submodules through ``_modules``, so a thin model at batch 1 runs faster.

FX's code names a submodule by its attribute chain (``self.layer1.0.conv1``), and every step of the chain
resolves through ``nn.Module.__getattr__``, a Python function that runs only after the ordinary lookup
has failed. That is a few microseconds per call of a module three to five levels deep: 1-6 ms per
forward of a batch-1 MobileNet, EfficientNet or RegNet on a CPU, up to a tenth of its latency, which the
eager model (one lookup per module, none in ``nn.Sequential``) does not pay. ``direct_access`` makes a
graph's code index ``self._modules['layer1']._modules['0']._modules['conv1']`` instead: the lookups that
``__getattr__`` itself makes, so a submodule the user replaces or deletes is seen as before.

It wraps whatever code generator the graph has (a torch.export graph's handles its inputs' and outputs'
structure) and only rewrites the module paths in the code that generator emits, each time it runs.
TorchScript compiles attribute chains only: ``DirectGraphModule`` hands it ``fx_code``'s copy.

A torch.export graph records batch norm and dropout as ops whose training flag is a literal of the mode
at export. ``DirectGraphModule.train``/``eval`` set those literals too (``follow_mode``), so a result
of the export path fine-tunes as the model did: batch statistics and dropout in train mode.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection
from typing import Any

import torch.fx
from torch import nn
from torch.fx.graph import CodeGen, PythonCode

__all__ = ["direct_access", "fx_code", "follow_mode", "DirectGraphModule"]

_CLASSES: dict[type, type] = {}
_aten = torch.ops.aten
# aten ops whose behaviour follows the training flag, and the position of that flag among their arguments.
_MODE_ARGS = {_aten.batch_norm.default: 5, _aten.dropout.default: 2, _aten.feature_dropout.default: 2,
              _aten.alpha_dropout.default: 2, _aten.feature_alpha_dropout.default: 2}


def _attribute_chain(root: str, target: str) -> str:
    """How FX's code names ``target`` under ``root`` (a step that is not an identifier goes through getattr)."""
    for step in target.split("."):
        root = f"{root}.{step}" if step.isidentifier() else f'getattr({root}, "{step}")'
    return root


def _direct(root: str, path: list[str]) -> str:
    return root + "".join(f"._modules[{step!r}]" for step in path)


class _DirectAccess:
    """Mixed into the graph's own code generator class (see the module docstring)."""

    def _gen_python_code(self, nodes: Any, root_module: str, *args: Any, **kwargs: Any) -> PythonCode:
        edits = self.__dict__.pop("_edits_of", None)  # once: set by DirectGraphModule for its first compile
        if edits is not None and (code := _edited_lines(*edits, list(nodes), root_module)) is not None:
            return code
        code = super()._gen_python_code(nodes, root_module, *args, **kwargs)  # type: ignore[misc]
        fast = {}
        for n in nodes:
            if n.op == "call_module" or (n.op == "get_attr" and "." in n.target):
                *owners, last = n.target.split(".")
                path = _direct(root_module, owners)
                fast[_attribute_chain(root_module, n.target)] = (
                    f"{path}._modules[{last!r}]" if n.op == "call_module" else _attribute_chain(path, last))
        # A module call or attribute read is emitted as ``name = <chain>...``: each whole attribute chain that
        # starts a right-hand side (a literal " = " to search for: a tenth of the time of every chain from the
        # root); the ones that name a node's target change.
        chain = re.compile(rf' = ((?:getattr\()*{re.escape(root_module)}(?:\.[A-Za-z_]\w*|, "[^"]*"\))*)')
        code.src = chain.sub(lambda m: " = " + fast.get(m.group(1), m.group(1)), code.src)
        return code


_DELETES = re.compile(r";  ((?:[A-Za-z_]\w* = )+)None$")
"""The end of a line of FX's code that drops the values whose last use it is."""


def _edited_lines(code_of: DirectGraphModule, edited: Collection[str], nodes: list[torch.fx.Node], root_module: str) -> PythonCode | None:
    """``code_of``'s code with the lines of the ``edited`` nodes (by name) of ``nodes`` emitted anew.

    ``nodes`` copy ``code_of``'s graph node for node, and an edit only changes literals, so each edited
    node reads a subset of what it read (a literal replaces a size read, a split replaces a chunk).
    FX emits the edited nodes in a graph of their own (their inputs as placeholders, every value an
    output: no line drops a value); each line takes the place of the node's line in ``code_of``'s code
    and keeps that line's end, which drops what the captured code dropped there (a value an edit no
    longer reads is dropped where it was). For ShuffleNetV2's 14 split sizes: 1.1 ms, against 4 ms to
    generate all 370 lines. None (generate it all) where a name could mean something else.
    """
    old: dict[str, torch.fx.Node] = {}
    mini, env = torch.fx.Graph(), {}
    for was, n in zip(code_of.graph.nodes, nodes):
        if n.name not in edited:
            continue
        old[n.name] = was
        if was.name != n.name or not {i.name for i in n.all_input_nodes} <= {i.name for i in was.all_input_nodes}:
            return None
        for i in n.all_input_nodes:
            if i not in env:
                env[i] = mini.placeholder(i.name)
        env[n] = mini.node_copy(n, env.__getitem__)
    if any(copied.name != n.name for n, copied in env.items()):
        return None
    mini.output(tuple(env.values()))
    direct_access(mini)
    fresh = mini.python_code(root_module)
    known = type(code_of).forward.__globals__
    added = fresh.globals.keys() - known.keys()
    if any(known[k] is not v for k, v in fresh.globals.items() if k in known) or (added and added & {n.name for n in nodes}):
        return None
    emitted = {_assigned(line): line for line in fresh.src.split("\n")}
    lines, done = code_of._code.split("\n"), 0
    for k, line in enumerate(lines):
        if (name := _assigned(line)) not in edited:
            continue
        end = _DELETES.search(line)
        if end is not None and not set(end.group(1).split(" = ")[:-1]) <= {name, *(i.name for i in old[name].all_input_nodes)}:
            return None
        lines[k], done = emitted[name] + (end.group(0) if end is not None else ""), done + 1
    if done != len(old):
        return None
    return PythonCode("\n".join(lines), {**known, **fresh.globals}, code_of._lineno_map, code_of._prologue_start)


def _assigned(line: str) -> str | None:
    """The first word of an indented line of FX's forward: on a node's line, the name it assigns."""
    return line[4:].split(" ", 1)[0] if line.startswith("    ") else None


def _plain(codegen: CodeGen) -> CodeGen:
    """``codegen`` without ``_DirectAccess``."""
    if not isinstance(codegen, _DirectAccess):
        return codegen
    plain = copy.copy(codegen)
    plain.__class__ = type(codegen).__bases__[1]  # (_DirectAccess, the graph's own class)
    return plain


def direct_access(graph: torch.fx.Graph) -> None:
    """Make ``graph``'s code reach submodules through ``_modules``; takes effect at the next ``recompile``."""
    base = type(graph._codegen)
    if issubclass(base, _DirectAccess):
        return
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(f"Direct{base.__name__}", (_DirectAccess, base), {})
    codegen: CodeGen = copy.copy(graph._codegen)
    codegen.__class__ = cls
    graph.set_codegen(codegen)


def fx_code(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule over ``gm``'s modules that runs the code FX itself generates for its graph."""
    graph = copy.deepcopy(gm.graph)
    graph.set_codegen(_plain(graph._codegen))
    return torch.fx.GraphModule(gm, graph, type(gm).__name__)


def follow_mode(graph: torch.fx.Graph, training: bool) -> bool:
    """Set the training flag of every batch-norm and dropout op in ``graph`` to ``training``; whether any changed."""
    changed = False
    for n in graph.nodes:
        at = _MODE_ARGS.get(n.target) if n.op == "call_function" else None
        if at is not None and len(n.args) > at and n.args[at] is not training:
            n.args = (*n.args[:at], training, *n.args[at + 1:])
            changed = True
    return changed


_CODE_FIELDS = ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")
"""What ``GraphModule.recompile`` sets on the instance besides the class's ``forward``."""


def _assign(gm: torch.fx.GraphModule, attrs: dict[str, Any], graph: torch.fx.Graph) -> None:
    """Place ``attrs[t]`` at each ``call_module`` and ``get_attr`` target ``t`` of ``graph`` under ``gm``, as
    ``GraphModule.__init__`` does with a dict (shallower targets first; new containers are plain modules; a
    tensor that is not a parameter becomes a buffer), looking each step of a path up in ``_modules``:
    ``GraphModule`` reads it through ``nn.Module.__getattr__``, a microsecond a step (RegNetY-400MF's 237
    targets: 2.9 ms)."""
    targets = dict.fromkeys(n.target for n in graph.nodes if n.op in ("call_module", "get_attr"))
    for target in sorted(targets, key=lambda t: t.count(".")):
        *path, field = target.split(".")
        owner = gm
        for step in path:
            child = owner._modules.get(step)
            if child is None:  # a step that is not a submodule, read as FX reads it
                child = getattr(owner, step, None)
            if child is None:
                child = nn.Module()
                setattr(owner, step, child)
            owner = child
        value = attrs[target]
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            owner.register_buffer(field, value)
        else:
            setattr(owner, field, value)


class DirectGraphModule(torch.fx.GraphModule):
    """A GraphModule whose code is ``direct_access``'s; ``torch.jit.script`` gets a copy with FX's own code.

    ``code_of``: a DirectGraphModule whose graph ``graph`` copies node for node, but for the nodes named
    in ``edited`` (a rewrite's literals). With no edit, the new module's class takes that module's
    compiled ``forward`` rather than generate and compile the same source again (for a 270-node graph, 8
    of the rewrite's 30 ms); with edits, its first code is ``code_of``'s with the edited nodes' lines
    emitted anew (``_edited_lines``). A later ``recompile`` generates the module's own, as for any GraphModule.
    A dict ``root`` (a rewrite's copies, by target) is placed by ``_assign``; taking ``code_of``'s code needs one.
    """

    def __init__(self, root: nn.Module | dict[str, Any], graph: torch.fx.Graph, class_name: str = "GraphModule",
                 code_of: DirectGraphModule | None = None, edited: Collection[str] = ()) -> None:
        direct_access(graph)
        if code_of is not None and edited:
            graph.set_codegen(copy.copy(graph._codegen))  # a copy of a graph shares its codegen
            graph._codegen._edits_of = (code_of, frozenset(edited))
        if not isinstance(root, dict):
            super().__init__(root, graph, class_name)
            return
        super().__init__({}, torch.fx.Graph(), class_name)  # FX's fields and call wrapper, over an empty graph
        _assign(self, root, graph)
        if code_of is not None and not edited:
            cls = type(self)  # the instance's own class, as GraphModule makes
            cls.forward = type(code_of).forward
            cls._inherited_code = {k: code_of.__dict__[k] for k in _CODE_FIELDS if k in code_of.__dict__}
        self.graph = graph

    def recompile(self) -> PythonCode:
        """``GraphModule.recompile``; the first call of a module made with ``code_of`` takes that module's code."""
        cls = type(self)
        fields = cls.__dict__.get("_inherited_code")
        if fields is None:
            return super().recompile()
        del cls._inherited_code  # once: a later recompile follows the graph
        self.__dict__.update(fields)
        self._recompile_submodules()
        return PythonCode(self._code, cls.forward.__globals__, self._lineno_map, self._prologue_start)

    def train(self, mode: bool = True) -> DirectGraphModule:
        """``nn.Module.train``, and the graph's own batch-norm and dropout ops follow (``follow_mode``)."""
        super().train(mode)
        if follow_mode(self.graph, mode):
            self.recompile()
        return self

    def __prepare_scriptable__(self) -> torch.fx.GraphModule:
        return fx_code(self)
