"""Shape rules: a node's output shape and dtype from its inputs' and its module's, without running it.

The shapes pass runs the graph once to learn every node's output; on a thin model at batch 1 that run,
through the interpreter, costs 1.1-1.9 forward passes: most of a FLOPs-target compile. For ops whose
output shape is a function of their inputs' shapes and their module's attributes alone (convolutions,
norms, activations, pools, linear layers, elementwise arithmetic, concatenation, the shape ops and the
size arithmetic around them), these rules give it in microseconds, checking what the op itself would
reject (a channel count, a dtype); strides are a contiguous tensor's or the input's (no pass reads
them). A function or method without a rule of its own (attention, einsum, indexing, softmax ...) runs
on meta tensors of its inputs' shapes under ``FlopCounterMode``: the shape, dtype and FLOPs torch itself
gives, with no data read (an op whose output shape depends on data fails there; a dtype that only a
device's kernel rejects does not, and fails where the model runs, as ``verify=True`` does). ``infer``
covers a whole graph or none of it: a module without a rule, or an op that would fail, and the graph
runs as before. Of the ops with rules, only the convolution and linear modules do work that
``FlopCounterMode`` counts.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from .flops import counter

__all__ = ["infer"]

Rule = Callable[[tuple[Any, ...], dict[str, Any], Any], Any]
_RULES: dict[Any, Rule] = {}  # module class, function or method name -> rule


class _Unknown(Exception):
    """The rules cannot tell this node's output: the graph runs instead."""


def rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register a rule ``(args, kwargs, module) -> output`` for module classes (matched exactly: a
    subclass may compute otherwise), functions and Tensor method names."""
    def register(fn: Rule) -> Rule:
        for t in targets:
            _RULES[t] = fn
        return fn
    return register


def tensor(shape: Sequence[int], dtype: torch.dtype) -> TensorMetadata:
    """The metadata of a fresh contiguous tensor."""
    shape = torch.Size(shape)
    stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
    return TensorMetadata(shape, dtype, False, stride, None, False, {})


def _t(v: Any, ndim: int | None = None) -> TensorMetadata:
    if not isinstance(v, TensorMetadata) or (ndim is not None and len(v.shape) != ndim):
        raise _Unknown
    return v


def _check(ok: bool) -> None:
    if not ok:
        raise _Unknown


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    k = mod.weight.dim() - 2
    x = _t(args[0], k + 2)
    _check(x.shape[1] == mod.in_channels and x.dtype == mod.weight.dtype and not isinstance(mod.padding, str))
    out = [(size + 2 * p - d * (kk - 1) - 1) // s + 1
           for size, p, d, kk, s in zip(x.shape[2:], mod.padding, mod.dilation, mod.kernel_size, mod.stride)]
    _check(min(out) > 0)
    return tensor((x.shape[0], mod.out_channels, *out), x.dtype)


@rule(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
def linear(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    x = _t(args[0])
    _check(len(x.shape) >= 1 and x.shape[-1] == mod.in_features and x.dtype == mod.weight.dtype)
    return tensor((*x.shape[:-1], mod.out_features), x.dtype)


@rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    x = _t(args[0])
    ndims = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}[type(mod)]
    _check(len(x.shape) in ndims and x.shape[1] == mod.num_features and (mod.weight is None or x.dtype == mod.weight.dtype))
    return x


def _layer_norm(x: TensorMetadata, shape: Sequence[int], weight: Any) -> TensorMetadata:
    shape = _tuple(shape, 1)
    _check(tuple(x.shape[len(x.shape) - len(shape):]) == shape and (weight is None or weight.dtype == x.dtype))
    return x


@rule(nn.LayerNorm, F.layer_norm)
def layer_norm(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    if mod is not None:
        return _layer_norm(_t(args[0]), mod.normalized_shape, mod.weight)
    return _layer_norm(_t(args[0]), _arg(args, kwargs, 1, "normalized_shape"), _arg(args, kwargs, 2, "weight"))


@rule(nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
      nn.Mish, nn.Softmax, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, F.relu, F.relu6, F.gelu, F.silu, F.hardswish,
      F.hardsigmoid, F.dropout, torch.relu, torch.sigmoid, torch.tanh, "contiguous", "relu", "sigmoid")
def same(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    return _t(_arg(args, kwargs, 0, "input"))


@rule(nn.Identity)
def identity(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> Any:
    return args[0]


def _pool(x: TensorMetadata, k: int, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil: bool) -> TensorMetadata:
    _check(len(x.shape) in (k + 1, k + 2))
    kernel, padding, dilation = _tuple(kernel, k), _tuple(padding, k), _tuple(dilation, k)
    stride = _tuple(stride, k) if stride not in (None, [], ()) else kernel
    out = []
    for size, kk, s, p, d in zip(x.shape[-k:], kernel, stride, padding, dilation):
        _check(2 * p <= kk)
        span = size + 2 * p - d * (kk - 1) - 1
        n = (-(-span // s) if ceil else span // s) + 1
        if ceil and (n - 1) * s >= size + p:  # the last window must start inside the input or its left padding
            n -= 1
        _check(n > 0)
        out.append(n)
    return tensor((*x.shape[:-k], *out), x.dtype)


@rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def max_pool(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    _check(not mod.return_indices)
    k = int(type(mod).__name__[-2])
    return _pool(_t(args[0]), k, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)


@rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def avg_pool(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    k = int(type(mod).__name__[-2])
    return _pool(_t(args[0]), k, mod.kernel_size, mod.stride, mod.padding, 1, mod.ceil_mode)


def _adaptive(x: TensorMetadata, k: int, size: Any) -> TensorMetadata:
    _check(len(x.shape) in (k + 1, k + 2))
    size = _tuple(size, k)
    return tensor((*x.shape[:-k], *(s if s is not None else n for s, n in zip(size, x.shape[-k:]))), x.dtype)


@rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
def adaptive_pool_module(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    _check(not getattr(mod, "return_indices", False))
    return _adaptive(_t(args[0]), int(type(mod).__name__[-2]), mod.output_size)


@rule(F.adaptive_avg_pool2d)
def adaptive_avg_pool2d(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    return _adaptive(_t(args[0]), 2, _arg(args, kwargs, 1, "output_size"))


def _dim(d: int, n: int) -> int:
    _check(-max(n, 1) <= d < max(n, 1))
    return d % max(n, 1)


def _flatten(x: TensorMetadata, start: int, end: int) -> TensorMetadata:
    n = len(x.shape)
    if n == 0:
        return tensor((1,), x.dtype)
    start, end = _dim(start, n), _dim(end, n)
    _check(start <= end)
    return tensor((*x.shape[:start], math.prod(x.shape[start:end + 1]), *x.shape[end + 1:]), x.dtype)


@rule(nn.Flatten, torch.flatten, "flatten")
def flatten(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    if mod is not None:
        return _flatten(_t(args[0]), mod.start_dim, mod.end_dim)
    return _flatten(_t(args[0]), _arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1))


@rule(F.channel_shuffle)
def shuffle(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    x, groups = _t(_arg(args, kwargs, 0, "input")), _arg(args, kwargs, 1, "groups")
    _check(len(x.shape) > 2 and isinstance(groups, int) and groups > 0 and x.shape[1] % groups == 0)
    return tensor(x.shape, x.dtype)


_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv)
_VALUE_OPS = (*_ARITHMETIC, operator.mod, operator.neg, operator.getitem, operator.eq, operator.ne, operator.lt, operator.le,
              operator.gt, operator.ge)  # evaluated as they are when no argument is a tensor


@rule(*_ARITHMETIC, torch.add, torch.mul, "add", "mul")
def arithmetic(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    tensors = [v for v in (*args[:2], kwargs.get("other")) if isinstance(v, TensorMetadata)]
    others = [v for v in (*args[:2], kwargs.get("other")) if v is not None and not isinstance(v, TensorMetadata)]
    _check(bool(tensors) and all(isinstance(v, (int, float, bool)) for v in others))
    dtype = tensors[0].dtype
    _check(dtype.is_floating_point and all(t.dtype == dtype for t in tensors))
    n = max(len(t.shape) for t in tensors)  # torch.broadcast_shapes, without its 25 us a call (squeeze-excitation models have dozens)
    sizes = [{d for d in dims if d != 1} for dims in zip(*((1,) * (n - len(t.shape)) + tuple(t.shape) for t in tensors))]
    _check(all(len(s) <= 1 and all(isinstance(d, int) for d in s) for s in sizes))
    return tensor([s.pop() if s else 1 for s in sizes], dtype)


@rule(torch.cat)
def cat(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    xs = [_t(v) for v in _arg(args, kwargs, 0, "tensors")]
    _check(bool(xs) and all(len(x.shape) == len(xs[0].shape) > 0 and x.dtype == xs[0].dtype for x in xs))
    d = _dim(_arg(args, kwargs, 1, "dim", 0), len(xs[0].shape))
    rest = [x.shape[:d] + x.shape[d + 1:] for x in xs]
    _check(all(r == rest[0] for r in rest))
    shape = list(xs[0].shape)
    shape[d] = sum(x.shape[d] for x in xs)
    return tensor(shape, xs[0].dtype)


@rule(torch.permute, "permute")
def permute(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    x = _t(args[0])
    dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:] or kwargs.get("dims")
    n = len(x.shape)
    order = [_dim(d, n) for d in dims]
    _check(sorted(order) == list(range(n)))
    return tensor([x.shape[d] for d in order], x.dtype)


@rule(torch.transpose, "transpose")
def transpose(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    x = _t(args[0])
    a, b = _dim(_arg(args, kwargs, 1, "dim0"), len(x.shape)), _dim(_arg(args, kwargs, 2, "dim1"), len(x.shape))
    shape = list(x.shape)
    shape[a], shape[b] = shape[b], shape[a]
    return tensor(shape, x.dtype)


@rule("view", "reshape")
def view(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    x = _t(args[0])
    sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    _check(all(isinstance(s, int) for s in sizes) and sum(s == -1 for s in sizes) <= 1)
    known = math.prod(s for s in sizes if s != -1)
    numel = math.prod(x.shape)
    if -1 in sizes:
        _check(known > 0 and numel % known == 0)
        sizes = [numel // known if s == -1 else s for s in sizes]
    _check(math.prod(sizes) == numel)
    return tensor(sizes, x.dtype)


@rule(torch.chunk, "chunk")
def chunk(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> tuple[TensorMetadata, ...]:
    x = _t(args[0])
    chunks, d = _arg(args, kwargs, 1, "chunks"), _dim(_arg(args, kwargs, 2, "dim", 0), len(x.shape))
    size = x.shape[d]
    _check(isinstance(chunks, int) and chunks > 0 and size > 0)
    step = -(-size // chunks)
    return tuple(tensor((*x.shape[:d], min(step, size - start), *x.shape[d + 1:]), x.dtype) for start in range(0, size, step))


@rule(torch.mean, "mean")
def mean(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> TensorMetadata:
    x = _t(args[0])
    dims, keep = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "keepdim", False)
    _check(x.dtype.is_floating_point and "dtype" not in kwargs)
    n = len(x.shape)
    dims = range(n) if dims is None else {_dim(d, n) for d in _tuple(dims, 1)}
    return tensor([1 if d in dims else s for d, s in enumerate(x.shape) if keep or d not in dims], x.dtype)


@rule("size")
def size(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> Any:
    x = _t(args[0])
    d = _arg(args, kwargs, 1, "dim")
    return x.shape if d is None else x.shape[_dim(d, len(x.shape))]


@rule(getattr)
def attribute(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> Any:
    x, name = _t(args[0]), args[1]
    _check(name in ("shape", "dtype", "ndim"))
    return {"shape": x.shape, "dtype": x.dtype, "ndim": len(x.shape)}[name]


@rule(operator.getitem)
def getitem(args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> Any:
    """One of a tuple of tensors (a chunk's); indexing a tensor runs on meta tensors."""
    container = args[0]
    if isinstance(container, (tuple, list)) and any(isinstance(v, TensorMetadata) for v in container):
        _check(len(args) == 2 and isinstance(args[1], int) and -len(container) <= args[1] < len(container))
        return container[args[1]]
    raise _Unknown


def _plain(v: Any) -> bool:
    return not isinstance(v, (TensorMetadata, torch.Tensor)) and not (isinstance(v, (tuple, list)) and not all(map(_plain, v)))


def _leaves(v: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` of every leaf of ``v`` (tuples, lists and dicts are walked; a ``TensorMetadata`` is a leaf)."""
    if isinstance(v, (tuple, list)) and not isinstance(v, TensorMetadata):
        return type(v)(_leaves(x, fn) for x in v) if not hasattr(v, "_fields") else type(v)(*(_leaves(x, fn) for x in v))
    if isinstance(v, dict):
        return {k: _leaves(x, fn) for k, x in v.items()}
    return fn(v)


def _on_meta(n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], device: torch.device) -> tuple[Any, int]:
    """``n``'s function or method run on meta tensors shaped as its inputs, under FlopCounterMode; a device
    it gives (``x.device``) is the graph's own ``device``, as running it would give."""
    def meta(v: Any) -> Any:
        return torch.empty_strided(v.shape, v.stride, dtype=v.dtype, device="meta") if isinstance(v, TensorMetadata) else v

    def back(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return _extract_tensor_metadata(v, include_contiguity=False)
        return device if isinstance(v, torch.device) and v.type == "meta" else v

    margs, mkwargs = _leaves(args, meta), _leaves(kwargs, meta)
    try:
        with counter() as flops:
            out = n.target(*margs, **mkwargs) if n.op == "call_function" else getattr(margs[0], n.target)(*margs[1:], **mkwargs)
    except Exception:  # an op that reads data (nonzero, item ...) or would fail: the graph runs instead
        raise _Unknown from None
    return _leaves(out, back), flops.get_total_flops()


def _value(n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], modules: dict[str, nn.Module], root: nn.Module,
           device: torch.device) -> tuple[Any, int | None]:
    """``n``'s output and, where it ran on meta tensors, its FLOPs."""
    if n.op == "get_attr":
        owner, _, name = n.target.rpartition(".")
        v = getattr(root.get_submodule(owner), name)
        return (_extract_tensor_metadata(v, include_contiguity=False) if isinstance(v, torch.Tensor) else v), None
    if n.op == "output":
        return args[0], None
    if n.op == "call_module":
        mod = modules[n.target]
        fn = _RULES.get(type(mod))
        if fn is None:
            raise _Unknown
        return fn(args, kwargs, mod), None
    if n.op == "call_function" and n.target in _VALUE_OPS and all(map(_plain, args)) and all(map(_plain, kwargs.values())):
        return n.target(*args, **kwargs), None  # arithmetic on sizes
    fn = _RULES.get(n.target)
    if fn is not None:
        try:
            return fn(args, kwargs, None), None
        except _Unknown:
            pass
    return _on_meta(n, args, kwargs, device)


def infer(gm: torch.fx.GraphModule, inputs: Sequence[Any], modules: dict[str, nn.Module]) -> tuple[dict[torch.fx.Node, Any], dict[torch.fx.Node, int]] | None:
    """Each node's output as ``TensorMetadata`` (tuples of them for a chunk) or its plain value (a size),
    and the FLOPs of the nodes that ran on meta tensors; None when a module has no rule, an op would fail,
    or the graph's tensors are on more than one device. ``modules``: ``modules_of(gm)``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    devices = {t.device for t in inputs if isinstance(t, torch.Tensor)}
    devices |= {t.device for m in modules.values() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None}
    if len(placeholders) != len(inputs) or len(devices) > 1:
        return None
    device = next(iter(devices), torch.device("cpu"))
    given = iter(inputs)
    env: dict[torch.fx.Node, Any] = {}
    flops: dict[torch.fx.Node, int] = {}
    lookup = env.__getitem__
    try:
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                v = next(given)
                env[n] = _extract_tensor_metadata(v, include_contiguity=False) if isinstance(v, torch.Tensor) else v
                continue
            args = map_aggregate(n.args, lambda a: lookup(a) if isinstance(a, torch.fx.Node) else a)
            kwargs = map_aggregate(n.kwargs, lambda a: lookup(a) if isinstance(a, torch.fx.Node) else a)
            env[n], counted = _value(n, args, kwargs, modules, gm, device)
            if counted is not None:
                flops[n] = counted
    except (_Unknown, TypeError, IndexError, AttributeError):
        return None
    return env, flops
