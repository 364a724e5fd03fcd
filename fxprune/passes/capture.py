"""capture: ``nn.Module`` or ``torch.export.ExportedProgram`` -> ``torch.fx.GraphModule``.

The model is copied structurally first (new module objects that share the user's tensors), so nothing
done to the graph or to module attributes afterwards can reach the user's model. Tracing follows
``torch.fx.symbolic_trace``'s rules. Fallbacks, in order, when that fails:

1. ``torch.export.export`` (non-strict) on the example inputs: it handles shape-dependent Python that
   symbolic tracing cannot, and yields an aten-level graph the coupling pass understands (also used
   when a traced graph fails to run, e.g. because a leaf function mutates a list argument). Skipped
   when the run has sizes that depend on the data, as a detector's do: export fails on those, slowly.
   That run (step 3's) is therefore taken first: one extra eval-mode run where export then succeeds,
   against minutes of a failing export on a detector. Not for a Hugging Face model, which is not
   traced first and whose forward computes no data-sized tensors (a fifth of its capture's time);
2. symbolic tracing again, keeping each submodule that cannot be traced as one opaque call; the
   coupling pass then freezes every channel it touches;
3. the ops that one eval-mode run on the example inputs executes (``make_fx`` with real tensors, at the
   level torch.export uses), parameters read by their qualified names. Detectors land here: image
   transforms, anchors, box decoding and NMS run in Python on the data, so no tracer captures them
   whole. The graph records that one run, sizes and branches included, so it serves the analysis only;
   ``gm.meta["fxprune_tree"]`` keeps the module tree it ran, and the result of pruning is a pruned
   copy of that tree (``results/transplant.py``). Python branches that the example inputs do not take
   are not seen: the verification checks the result on the example inputs only, and a module with
   parameters that the run never used (in a branch not taken) is an error, since it may read channels
   that pruning removes.

``gm.meta["fxprune_capture"]`` says how the graph was captured (and why a fallback was needed), and
``gm.meta["fxprune_opaque"]`` lists opaque modules; both are shown in the report.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import logging
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from ..core.codegen import DirectGraphModule
from ..core import dynamic
from ..core import metakeys as keys
from ..errors import TraceError
from ..core.fxutil import eval_mode, is_hf, structural_copy
from ..core.traceable import expand, inlined_functions, library_functions

log = logging.getLogger("fxprune")

__all__ = ["capture"]

_MAX_OPAQUE = 64
# torch.nn leaves that the coupling pass cannot see into and symbolic tracing cannot enter.
_EXPORT_ONLY = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer,
                nn.TransformerDecoderLayer)


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer that also treats the modules in ``opaque`` as leaves, records library
    modules that ``traceable.expand`` knows as plain ops and the library functions that
    ``traceable.inlined_functions`` replaces as leaves, and remembers which module was being traced
    when tracing failed."""

    def __init__(self, opaque: set[str]) -> None:
        super().__init__(autowrap_functions=tuple(inlined_functions()))
        self.opaque = opaque
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(m, _EXPORT_ONLY):
            raise TraceError(f"{type(m).__name__} checks tensor properties in Python (its fast path); "
                             "torch.export records the computation it takes")
        try:
            expanded = None if self.path_of_module(m) in self.opaque else expand(m, args, kwargs)
            return expanded if expanded is not None else super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def _user_frame(exc: BaseException) -> str:
    """The innermost stack frame outside torch's own code, as 'file:line: source'."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "<unknown location>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def _trace(root: nn.Module, opaque: set[str]) -> torch.fx.GraphModule:
    tracer = _Tracer(opaque)
    graph = tracer.trace(root)
    replacements, inlined = library_functions(), inlined_functions()
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in replacements:
            node.target = replacements[node.target]
        elif node.op == "call_function" and node.target in inlined:
            _inline(graph, node, inlined[node.target])
    gm = DirectGraphModule(tracer.root, graph, root.__class__.__name__)  # the code a result that edits no node keeps
    gm.meta[keys.OPAQUE] = sorted(opaque)
    return gm


@functools.cache
def _body(fn: Callable[..., Any]) -> torch.fx.Graph:
    return torch.fx.symbolic_trace(fn).graph


def _inline(graph: torch.fx.Graph, node: torch.fx.Node, fn: Callable[..., Any]) -> None:
    """Put the traced ops of ``fn``, called with ``node``'s arguments (bound as its own function takes them,
    then in order), in place of ``node``; they are inside the modules ``node`` was (its ``nn_module_stack``)."""
    body = _body(fn)
    given = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    given.apply_defaults()
    with graph.inserting_before(node):
        out, env = _splice(graph, body, given.arguments.values())
    for b in body.nodes:
        if b.op == "call_function" or b.op == "call_method":
            env[b].meta.update((k, v) for k, v in node.meta.items() if k != "is_wrapped")  # a leaf's mark: FX would wrap()
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _splice(graph: torch.fx.Graph, body: torch.fx.Graph, args: Iterable[Any]) -> tuple[Any, dict[torch.fx.Node, Any]]:
    """``body``'s ops copied into ``graph`` at its insert point, its placeholders given ``args`` in order:
    (the value ``body`` outputs, each ``body`` node -> its copy or argument)."""
    env: dict[torch.fx.Node, Any] = dict(zip((p for p in body.nodes if p.op == "placeholder"), args))
    return graph.graph_copy(body, env), env


def _trace_with_opaque(root: nn.Module) -> torch.fx.GraphModule:
    """Symbolic tracing where every submodule that fails to trace becomes an opaque leaf."""
    opaque: set[str] = set()
    while True:
        tracer = _Tracer(opaque)
        try:
            tracer.trace(root)
        except Exception:
            where = tracer.failed_in
            if not where or where in opaque or len(opaque) >= _MAX_OPAQUE:
                raise
            opaque.add(where)
            continue
        return _trace(root, opaque)


def _inline_contexts(gm: torch.fx.GraphModule) -> None:
    """Replace each region that torch.export wrapped in a higher-order op (grad mode, autocast) by its ops
    between explicit calls that enter and leave the context, as export recorded them before wrapping: the
    coupling rules then see the ops, and the graph computes what it did."""
    from torch._higher_order_ops.wrap import WrapWithAutocast, WrapWithSetGradEnabled  # noqa: PLC0415 - export's own

    graph = gm.graph
    for node in list(graph.nodes):
        grad = isinstance(node.target, WrapWithSetGradEnabled)
        if node.op != "call_function" or not (grad or isinstance(node.target, WrapWithAutocast)):
            continue
        at = 1 if grad else 4  # (enabled, body, *operands) or (device, dtype, enabled, cache_enabled, body, *operands)
        holder = node.args[at]
        body = getattr(gm, holder.target)
        if any(n.op in ("get_attr", "call_module") for n in body.graph.nodes):
            continue  # a body with tensors or modules of its own stays wrapped (and frozen)
        with graph.inserting_before(node):
            if grad:
                before = graph.call_function(torch.is_grad_enabled)
                graph.call_function(torch._C._set_grad_enabled, node.args[:1])
            else:
                entered = graph.call_function(torch.amp.autocast_mode._enter_autocast, node.args[:4])
            outputs, _ = _splice(graph, body.graph, node.args[at + 1:])
            if grad:
                graph.call_function(torch._C._set_grad_enabled, (before,))
            else:
                graph.call_function(torch.amp.autocast_mode._exit_autocast, (entered,))
        for user in list(node.users):  # getitem(wrapped, i)
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not holder.users:
            graph.erase_node(holder)
            gm.delete_submodule(holder.target)
    graph.eliminate_dead_code()
    gm.recompile()


def _exported(ep: torch.export.ExportedProgram, how: str) -> torch.fx.GraphModule:
    """``ep``'s graph as a plain GraphModule: ``ep.module()`` refuses train()/eval() and checks its inputs
    in forward pre-hooks that module copies (the selectors' detached copies) do not keep working."""
    program = ep.module()
    gm = torch.fx.GraphModule(program, program.graph, type(program).__name__)
    _inline_contexts(gm)
    for m in gm.modules():  # its ops are fixed; the flag tells exporters (ONNX) that the result is for inference, as pruned
        m.training = False
    gm.meta[keys.CAPTURE] = how
    gm.meta[keys.OPAQUE] = []
    return gm


def _given_program(ep: torch.export.ExportedProgram, example_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """The graph of an ExportedProgram given as the model. One with static batch (or sequence) dims is
    exported again from its own module with those dims dynamic (``core/dynamic.py``), so the result
    takes any batch; where that fails, the program is used as given and the note says why."""
    how = "torch.export (an ExportedProgram was given)"
    dims = dynamic.wanted(example_inputs)
    if dims.keys() <= dynamic.dynamic_dims(ep) and not dynamic.size_arithmetic(ep):
        return _exported(ep, f"{how}; {dynamic.describe(dims, set(dims), '')}")
    try:
        again, note = dynamic.export(ep.module(check_guards=False), example_inputs, arithmetic=False)
    except Exception as exc:  # export fails in many ways; the program as given still works at its own shapes
        why = f"exporting its module again with dynamic dims failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        return _exported(ep, f"{how}; {dynamic.describe(dims, dynamic.dynamic_dims(ep), why)}")
    return _exported(again, f"{how}, exported again for dynamic dims; {note}")


def _executed(root: nn.Module, example_inputs: Sequence[Any], how: str) -> torch.fx.GraphModule:
    """The ops one eval-mode run of ``root`` executes on ``example_inputs``, with ``root``'s parameters
    and buffers as ``get_attr`` nodes of their qualified names (tensors the run makes from constants
    are attributes of the graph module)."""
    from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415 - slow to import, rarely needed

    tensors = {**dict(root.named_parameters(remove_duplicate=False)), **dict(root.named_buffers(remove_duplicate=False))}

    def run(state: dict[str, torch.Tensor], inputs: tuple[Any, ...]) -> Any:
        return torch.func.functional_call(root, state, inputs)

    with torch.no_grad(), eval_mode(root):
        traced = make_fx(run, tracing_mode="real", pre_dispatch=True, _error_on_data_dependent_ops=False)(tensors, tuple(example_inputs))
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    owner = structural_copy(root)
    for n in graph.nodes:  # constants the run made (an image mean, an anchor template)
        if n.op == "get_attr":
            setattr(owner, n.target, getattr(traced, n.target))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_attr warns that ``traced`` lacks the modules named: ``owner`` has them
        for name, node in zip(tensors, placeholders):  # the state dict comes first, in order
            with graph.inserting_before(node):
                node.replace_all_uses_with(graph.get_attr(name))
            graph.erase_node(node)
        gm = torch.fx.GraphModule(owner, graph, type(root).__name__)
    gm.meta[keys.CAPTURE] = how
    gm.meta[keys.OPAQUE] = []
    gm.meta[keys.TREE] = root
    return gm


def _recorded(root: nn.Module, example_inputs: Sequence[Any], how: str) -> tuple[torch.fx.GraphModule | None, Exception | None]:
    """``_executed``'s graph, or why the run failed."""
    try:
        return _executed(root, example_inputs, how), None
    except Exception as exc:
        return None, exc


def _idle_modules(gm: torch.fx.GraphModule, root: nn.Module) -> list[str]:
    """The outermost modules of ``root`` with parameters, none of which the recorded run read."""
    params = dict(root.named_parameters(remove_duplicate=False))
    read = {id(params[n.target]) for n in gm.graph.nodes if n.op == "get_attr" and n.users and n.target in params}
    idle: list[str] = []
    for name, mod in root.named_modules():
        own = list(mod.parameters())
        if own and not any(id(p) in read for p in own) and not any(name.startswith(f"{i}.") for i in idle):
            idle.append(name)
    return idle


def _sized_by_data(gm: torch.fx.GraphModule) -> bool:
    """True when the recorded run has sizes that depend on its data (NMS keeps, a boolean mask
    selects): torch.export fails on such a model, after minutes on a detector."""
    for n in gm.graph.nodes:
        op = n.target
        if not isinstance(op, torch._ops.OpOverload):
            continue
        if (op.namespace, op._opname) == ("torchvision", "nms"):
            return True
        if torch.Tag.dynamic_output_shape in op.tags:
            if op is not torch.ops.aten.index.Tensor:
                return True
            if any(isinstance(a, torch.fx.Node) and getattr(a.meta.get("val"), "dtype", None) == torch.bool for a in n.args[1]):
                return True
    return False


def _without_cache(root: nn.Module) -> nn.Module:
    """``root`` whose Hugging Face configs (an encoder-decoder's stacks hold copies of their own) are copies
    that turn the key/value cache off: a forward that returns a cache object records no graph (torch.export
    cannot return it), and the computation to prune is the same without it."""
    quiet: dict[int, Any] = {}
    for m in root.modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", False) is True:
            if id(config) not in quiet:
                quiet[id(config)] = copy.copy(config)
                quiet[id(config)].use_cache = False
            m.config = quiet[id(config)]
    return root


def capture(model: nn.Module | torch.export.ExportedProgram, example_inputs: Sequence[Any] = (),
            untraceable: BaseException | None = None) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule of its own, with the fallbacks described above.

    ``untraceable``: why an earlier symbolically traced graph cannot be used (it fails to run on the
    example inputs); tracing is then skipped and the fallbacks start at once.
    """
    if isinstance(model, torch.export.ExportedProgram):
        return _given_program(model, example_inputs)
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module or torch.export.ExportedProgram, got {type(model).__name__}")
    root = _without_cache(structural_copy(model))
    if untraceable is None and is_hf(model):  # transformers' forwards build masks and caches in Python that tracing cannot follow
        first: BaseException = TraceError("a Hugging Face model")
        reason = "a Hugging Face model, not symbolically traced"
    elif untraceable is None:
        try:
            gm = _trace(root, set())
            gm.meta[keys.CAPTURE] = "torch.fx.symbolic_trace"
            return gm
        except Exception as exc:
            first = exc
        reason = f"symbolic_trace failed at {_user_frame(first)}: {type(first).__name__}: {str(first).splitlines()[0]}"
    else:
        first = untraceable
        reason = f"the symbolically traced graph fails to run: {str(first).splitlines()[0]}"
    executed = f"the ops one run on the example inputs executes; the result is a pruned copy of the module tree ({reason})"
    recorded = functools.partial(_recorded, root, example_inputs, executed)
    run, run_error = (None, None) if is_hf(model) else recorded()
    printed = io.StringIO()
    try:
        if run is not None and _sized_by_data(run):
            raise TraceError("the run has sizes that depend on the data (not tried)")
        with contextlib.redirect_stderr(printed):  # a failing export prints its partial graph; keep that for --verbose
            ep, dims = dynamic.export(root, example_inputs, arithmetic=False)
            gm = _exported(ep, f"torch.export ({reason}); {dims}")
        if is_hf(model):
            gm.meta[keys.HF] = model  # read only: results are built anew (results/hfmodel.py)
        return gm
    except Exception as exc:
        export_error = exc
    finally:
        if printed.getvalue().strip():
            log.debug("torch.export printed:\n%s", printed.getvalue())
    if run is None and run_error is None:
        run, run_error = recorded()
    try:
        gm = _trace_with_opaque(root)
        gm.meta[keys.CAPTURE] = f"torch.fx.symbolic_trace with opaque submodules ({reason})"
        return gm
    except Exception:
        if run is not None:
            idle = _idle_modules(run, root)
            if not idle:
                return run
            raise TraceError(
                f"could not capture {type(model).__name__}: only one eval-mode run on example_inputs records it "
                f"(symbolic_trace: {type(first).__name__}; torch.export: {type(export_error).__name__}), and that run did not "
                f"use {len(idle)} module(s) with parameters: {', '.join(idle[:4])}{', ...' if len(idle) > 4 else ''}. Unseen, they "
                "could read channels that pruning removes. Give example inputs on which every module runs, or move the "
                "branch that chooses between them into a submodule (it is then kept opaque and its channels frozen)."
            ) from first
    raise TraceError(
        f"could not capture {type(model).__name__} as a graph.\n"
        f"  torch.fx.symbolic_trace: {type(first).__name__}: {first}\n    at {_user_frame(first)}\n"
        f"  torch.export: {type(export_error).__name__}: {str(export_error).splitlines()[0]}\n"
        f"  one eval-mode run on example_inputs: {type(run_error).__name__}: {(str(run_error).splitlines() or [''])[0]}\n"
        "  hint: check that the model runs in eval mode on example_inputs (a detector takes a list of "
        "3-d images: example_inputs=([image],)); or move data-dependent control flow into a submodule "
        "(it is then kept opaque and its channels frozen)."
    ) from first
