"""Op tables: which torch functions, Tensor methods and nn modules belong to which op family.

Shared by the coupling pass (one rule per family) and the shapes pass (families that never do
FLOP-counted work skip FlopCounterMode, which is costly per op).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

ELEMENTWISE_FUNCS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.neg, operator.mod,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.true_divide,
    torch.maximum, torch.minimum, torch.where, torch.lerp, torch.addcmul, torch.addcdiv, torch.pow,
    torch.clamp, torch.clip, torch.sqrt, torch.rsqrt, torch.exp, torch.log, torch.abs, torch.neg,
    torch.sigmoid, torch.tanh, torch.relu, torch.relu_, torch.erf, torch.sign, torch.square, torch.cos, torch.sin, torch.reciprocal,
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.logsigmoid,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}
ELEMENTWISE_FUNCS |= {torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.masked_fill}
ELEMENTWISE_METHODS = {
    "eq", "ne", "lt", "le", "gt", "ge",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "sqrt", "rsqrt", "exp",
    "abs", "neg", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "clip",
    "square", "masked_fill", "masked_fill_", "lerp", "addcmul", "maximum", "minimum", "copy_", "cos", "sin", "reciprocal",
}
# Calls that enter and leave grad mode or autocast around a region (torch.export's wrapped regions, inlined
# by the capture pass): no tensors, no channels.
CONTEXT: set[Any] = {torch.is_grad_enabled, torch._C._set_grad_enabled, torch.amp.autocast_mode._enter_autocast,
                     torch.amp.autocast_mode._exit_autocast}
# Tensors made from nothing but sizes (the size of a model input's spatial dims, say): constants.
CREATE: set[Any] = {"new_zeros", "new_ones", "new_full", "new_empty", torch.zeros, torch.ones, torch.full, torch.empty,
                    torch.arange, torch.scalar_tensor}
# Max unpooling: values and the indices of the pool they undo, channel by channel.
UNPOOL_MODULES: tuple[type, ...] = (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d)
UNPOOL_FUNCS: set[Any] = {F.max_unpool1d, F.max_unpool2d, F.max_unpool3d}
FIRST_OPERAND_FUNCS: set[Any] = {
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.rand_like, torch.randn_like,
    torch.full_like, torch.clone,
}
FIRST_OPERAND_METHODS = {
    "contiguous", "clone", "detach", "detach_", "float", "half", "double", "bfloat16", "to", "type", "type_as",
    "cpu", "cuda", "requires_grad_", "fill_", "lift_fresh_copy",
}
ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
SPATIAL_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.ReplicationPad3d,
)
SPATIAL_FUNCS: set[Any] = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d, F.interpolate, F.upsample,
    torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d, F.max_pool1d_with_indices,
    F.max_pool2d_with_indices, F.max_pool3d_with_indices, F.adaptive_max_pool1d_with_indices,
    F.adaptive_max_pool2d_with_indices, F.adaptive_max_pool3d_with_indices,
}
CHANNEL_PARAM_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU,
)
# Shape ops that need nothing rewritten when a channel dim shrinks.
SHAPE_FUNCS: set[Any] = {
    torch.flatten, torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.squeeze,
    torch.unsqueeze, torch.cat, torch.concat, torch.concatenate, torch.stack, torch.flip, torch.t,
    torch.pixel_shuffle, torch.pixel_unshuffle, F.pixel_shuffle, F.pixel_unshuffle, torch.tile,
    torch.repeat_interleave,
}
SHAPE_METHODS = {
    "flatten", "permute", "transpose", "swapaxes", "movedim", "squeeze", "unsqueeze", "flip", "t", "numpy_T",
    "expand_as", "view_as", "reshape_as", "repeat", "tile", "repeat_interleave",
}
RESHAPE_METHODS = {"view", "reshape", "expand", "broadcast_to"}
RESHAPE_FUNCS: set[Any] = {torch.reshape, torch.broadcast_to}
UNFLATTEN: set[Any] = {torch.unflatten, "unflatten"}
SPLIT: set[Any] = {torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split"}
UNBIND: set[Any] = {torch.unbind, torch.select, "unbind", "select"}
MATMUL: set[Any] = {torch.matmul, operator.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm"}
SDPA: set[Any] = {F.scaled_dot_product_attention}
# aten ops without a torch function of the same meaning (torch.export's forms of x[a:b], x[idx], x[idx] = v).
ATEN_SLICE = "aten slice"
ATEN_INDEX = "aten index"
INDEX_PUT = "aten index_put"
# An operand that reaches one of these through PASS_THROUGH ops is split into attention heads.
ATTENTION_PRODUCTS: set[Any] = MATMUL | SDPA | {torch.einsum}
PASS_THROUGH: set[Any] = {
    operator.getitem, operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div", "contiguous",
    "to", "float", "type_as", "clone", torch.clone, F.dropout,
    operator.add, torch.add, "add", operator.neg, torch.neg, "neg", ATEN_SLICE,  # rotary embeddings
} | SHAPE_FUNCS | SHAPE_METHODS | RESHAPE_FUNCS | RESHAPE_METHODS | UNFLATTEN | UNBIND | SPLIT
CONV_FUNCS = {
    F.conv1d: False, F.conv2d: False, F.conv3d: False,
    F.conv_transpose1d: True, F.conv_transpose2d: True, F.conv_transpose3d: True,
}
REDUCTIONS = {"mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin}
MEAN = {"mean", torch.mean}  # the reduction whose statistic over channels verification can mask (RMSNorm's)
# Rectifier-like activations (a subset of the element-wise ops): their outputs are the activations
# that activation-statistics selectors (apoz, mean_activation, taylor) look at.
ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish,
    nn.Softplus, nn.Hardtanh,
)
ACTIVATION_FUNCS: set[Any] = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.hardswish, F.mish, F.softplus, F.hardtanh,
}
ACTIVATION_METHODS = {"relu", "relu_"}

SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"}

_ATEN_ONLY = {"slice": ATEN_SLICE, "index": ATEN_INDEX, "index_put": INDEX_PUT, "index_put_": INDEX_PUT}
# torchvision's RoI pooling operators (detectors): box by box, channel by channel, like a pooling op.
ROI_POOL = "torchvision roi pooling"
_TORCHVISION_AS = {"roi_align": ROI_POOL, "roi_pool": ROI_POOL}

FLOPLESS_FUNCS = ELEMENTWISE_FUNCS | FIRST_OPERAND_FUNCS | SHAPE_FUNCS | RESHAPE_FUNCS | SPATIAL_FUNCS | UNPOOL_FUNCS | {
    operator.getitem, torch.split, torch.chunk, torch.unbind, torch.select, torch.unflatten, F.batch_norm, F.layer_norm, F.group_norm, F.pad,
    getattr, torch.mean, torch.sum,
} | {f for f in SOFTMAX if not isinstance(f, str)}
FLOPLESS_METHODS = ELEMENTWISE_METHODS | FIRST_OPERAND_METHODS | SHAPE_METHODS | RESHAPE_METHODS | {
    "split", "chunk", "unbind", "select", "unflatten", "size", "dim", "mean", "sum", "numel", ATEN_SLICE, ATEN_INDEX,
    INDEX_PUT, ROI_POOL,
} | {f for f in SOFTMAX if isinstance(f, str)}
FLOPLESS_MODULES = ELEMENTWISE_MODULES + SPATIAL_MODULES + CHANNEL_PARAM_MODULES + UNPOOL_MODULES + (
    nn.LayerNorm, nn.GroupNorm, nn.Flatten, nn.Softmax, nn.ChannelShuffle,
)


# aten ops (as torch.export emits them) -> the torch function or Tensor method with the same arguments.
_ATEN_AS: dict[str, Any] = {
    "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d, "conv_transpose1d": F.conv_transpose1d,
    "conv_transpose2d": F.conv_transpose2d, "conv_transpose3d": F.conv_transpose3d, "linear": F.linear,
    "batch_norm": F.batch_norm, "instance_norm": F.instance_norm, "layer_norm": F.layer_norm,
    "group_norm": F.group_norm, "relu": torch.relu, "relu_": torch.relu, "gelu": F.gelu, "gelu_": F.gelu,
    "silu": F.silu, "silu_": F.silu, "hardswish": F.hardswish, "hardswish_": F.hardswish,
    "hardsigmoid": F.hardsigmoid, "hardsigmoid_": F.hardsigmoid, "sigmoid": torch.sigmoid,
    "sigmoid_": torch.sigmoid, "tanh": torch.tanh, "hardtanh": F.hardtanh, "hardtanh_": F.hardtanh,
    "dropout": F.dropout, "dropout_": F.dropout, "add": torch.add, "add_": torch.add, "sub": torch.sub,
    "sub_": torch.sub, "mul": torch.mul, "mul_": torch.mul, "div": torch.div, "div_": torch.div,
    "clamp": torch.clamp, "where": torch.where, "neg": torch.neg, "exp": torch.exp, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "max_pool1d": F.max_pool1d, "max_pool2d": F.max_pool2d, "max_pool3d": F.max_pool3d,
    "avg_pool1d": F.avg_pool1d, "avg_pool2d": F.avg_pool2d, "avg_pool3d": F.avg_pool3d,
    "adaptive_avg_pool1d": F.adaptive_avg_pool1d, "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "adaptive_avg_pool3d": F.adaptive_avg_pool3d, "cat": torch.cat, "permute": torch.permute,
    "transpose": torch.transpose, "flatten": torch.flatten, "unsqueeze": torch.unsqueeze,
    "squeeze": torch.squeeze, "contiguous": "contiguous", "clone": torch.clone, "view": "view",
    "reshape": torch.reshape, "expand": "expand", "chunk": torch.chunk, "split": torch.split,
    "split_with_sizes": torch.split, "mean": torch.mean, "sum": torch.sum, "amax": torch.amax,
    "softmax": torch.softmax, "log_softmax": torch.log_softmax, "pixel_shuffle": F.pixel_shuffle,
    "pixel_unshuffle": F.pixel_unshuffle, "channel_shuffle": F.channel_shuffle, "roll": torch.roll,
    "flip": torch.flip, "max_pool2d_with_indices": F.max_pool2d_with_indices,
    "max_pool3d_with_indices": F.max_pool3d_with_indices, "max_unpool2d": F.max_unpool2d, "max_unpool3d": F.max_unpool3d,
    "unbind": torch.unbind, "select": torch.select, "matmul": torch.matmul,
    "scaled_dot_product_attention": F.scaled_dot_product_attention, "einsum": torch.einsum, "bmm": torch.bmm, "mm": torch.mm,
    "zeros_like": torch.zeros_like, "ones_like": torch.ones_like,
}


_ATEN_AS.update({
    "embedding": torch.embedding, "addmm": torch.addmm, "linalg_vector_norm": torch.linalg.vector_norm,
    "alias": torch.clone, "pad": F.pad, "constant_pad_nd": F.pad, "unflatten": torch.unflatten,
    **dict.fromkeys(("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
                     "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_nearest_exact2d",
                     "_upsample_bilinear2d_aa"), F.interpolate),
})


def _by_name() -> dict[str, Any]:
    """Every function and Tensor method the tables name, by the name its aten op has."""
    names: dict[str, Any] = {}
    for table in (ELEMENTWISE_FUNCS, FIRST_OPERAND_FUNCS, SPATIAL_FUNCS, SHAPE_FUNCS, RESHAPE_FUNCS, UNFLATTEN, SPLIT, UNBIND,
                  MATMUL, REDUCTIONS, SOFTMAX, CREATE):
        for f in table:
            if isinstance(f, str):
                names.setdefault(f, f)
            elif getattr(torch, getattr(f, "__name__", ""), None) is f:
                names.setdefault(f.__name__, f)
    for table in (ELEMENTWISE_METHODS, FIRST_OPERAND_METHODS, SHAPE_METHODS, RESHAPE_METHODS):
        names.update((m, m) for m in table if m not in names)
    return names


_ATEN_BY_NAME = {**_by_name(), **_ATEN_AS, **_ATEN_ONLY}
_ATEN_BY_OVERLOAD = {torch.ops.aten.max.other: torch.maximum, torch.ops.aten.min.other: torch.minimum}
"""aten ops whose overload decides the function: ``max.other`` is elementwise (XGLM clamps its attention scores with it), ``max.dim`` a reduction."""


def canonical(target: Any) -> Any:
    """The torch function (or Tensor method name) a graph target stands for: one table serves both
    capture paths, so an aten op (torch.export) maps to the function or method of the same name."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return _ATEN_BY_OVERLOAD.get(target) or _ATEN_BY_NAME.get(target._opname, target)
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "torchvision":
        return _TORCHVISION_AS.get(target._opname, target)
    return target


def flopless(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True when FlopCounterMode is known to count nothing for this node."""
    if node.op == "call_module":
        return isinstance(modules[node.target], FLOPLESS_MODULES)
    t = canonical(node.target)
    if isinstance(t, str):
        return t in FLOPLESS_METHODS
    if node.op == "call_function":
        return t in FLOPLESS_FUNCS
    if node.op == "call_method":
        return node.target in FLOPLESS_METHODS
    return True


def is_activation(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True when ``node`` applies a rectifier-like activation (module, function or method form)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], ACTIVATION_MODULES)
    t = canonical(node.target)
    if node.op == "call_method" or isinstance(t, str):
        return t in ACTIVATION_METHODS
    return node.op == "call_function" and t in ACTIVATION_FUNCS


IN_FIELDS = ("in_channels", "in_features", "num_features", "num_channels", "normalized_shape", "num_parameters")
OUT_FIELDS = ("out_channels", "out_features", "num_features", "num_channels", "normalized_shape", "num_parameters")


def module_channels(mod: nn.Module, fields: tuple[str, ...]) -> int | None:
    """A module's channel count from the first of ``fields`` it has (IN_FIELDS or OUT_FIELDS). A field is an
    instance attribute or the class's (a property): ``getattr`` of one a module lacks goes through
    ``nn.Module.__getattr__``, which raises and catches an AttributeError (the report asks four times a layer)."""
    own, cls = mod.__dict__, type(mod)
    for f in fields:
        v = own[f] if f in own else getattr(mod, f, None) if hasattr(cls, f) else None
        if isinstance(v, int):
            return v
        if isinstance(v, (tuple, list)) and v and isinstance(v[-1], int):
            return v[-1]
    return None
