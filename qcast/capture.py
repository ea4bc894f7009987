"""Capture: nn.Module -> torch.fx graph, with module paths, op names and shapes on every node.

Why torch.fx (see docs/design.md): it keeps module boundaries (a conv is one ``call_module`` node whose
target is the user's module path), so every report and error can name ``layer1.0.conv1``; it needs no
dynamic-shape declarations, so the quantized model runs at any resolution or sequence length.

A submodule whose own Python cannot be traced (data-dependent control flow such as
``if x.mean() > 0:``) becomes an *opaque region*: it is called as a leaf, runs in float, and
``explain()`` lists it with the reason. The rest of the model is still quantized.
"""
from __future__ import annotations

import copy
import inspect
import linecache
import numbers
import operator
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import CaptureError, InputError

def attr_at(root: nn.Module, target: str) -> Any:
    """The attribute a ``get_attr`` / ``call_module`` target names (``"layer1.0.scale"``), walked from ``root``."""
    obj = root
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def copy_io(src: fx.GraphModule, graph: fx.Graph) -> None:
    """Give ``graph`` the input/output convention of ``src``'s graph: a graph captured through torch.export
    flattens its inputs and rebuilds its output structure (e.g. a Hugging Face ``BaseModelOutput``) with pytree
    specs; a graph rebuilt node by node must keep that, or the int8 model would return a bare tuple."""
    graph._codegen = copy.deepcopy(src.graph._codegen)


def copy_specs(src: nn.Module, dst: nn.Module) -> None:
    """The pytree specs the generated code of a torch.export graph reads (``self._in_spec``/``self._out_spec``)."""
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))


# -------------------------------------------------------------------------------------------------
# op names: every node gets one plain name; kernels are registered against these names
# -------------------------------------------------------------------------------------------------
MODULE_OPS: dict[type, str] = {
    nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d", nn.Linear: "linear",
    nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
    nn.Hardtanh: "hardtanh", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu", nn.SiLU: "silu",
    nn.Hardsigmoid: "hardsigmoid", nn.ELU: "elu", nn.PReLU: "prelu", nn.Mish: "mish",
    nn.MaxPool1d: "max_pool", nn.MaxPool2d: "max_pool", nn.AvgPool1d: "avg_pool", nn.AvgPool2d: "avg_pool",
    nn.AdaptiveAvgPool1d: "adaptive_avg_pool", nn.AdaptiveAvgPool2d: "adaptive_avg_pool",
    nn.AdaptiveMaxPool2d: "adaptive_max_pool",
    nn.Flatten: "flatten", nn.Upsample: "interpolate", nn.UpsamplingNearest2d: "interpolate",
    nn.UpsamplingBilinear2d: "interpolate", nn.Dropout: "dropout", nn.Dropout2d: "dropout",
    nn.Identity: "identity", nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax",
    nn.GroupNorm: "group_norm", nn.LayerNorm: "layer_norm", nn.InstanceNorm2d: "instance_norm",
    nn.Embedding: "embedding", nn.LSTM: "lstm", nn.GRU: "gru", nn.MultiheadAttention: "multihead_attention",
    nn.ZeroPad2d: "pad", nn.PixelShuffle: "pixel_shuffle", nn.EmbeddingBag: "embedding_bag",
}

#: the op names of layers with a weight (conv/linear-like): what explain() counts as "conv/linear int8"
WEIGHTED_OPS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "linear")

FUNCTION_OPS: dict[Any, str] = {
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    operator.sub: "sub", torch.sub: "sub", operator.truediv: "div", torch.div: "div",
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "bmm",
    torch.cat: "cat", torch.concat: "cat", torch.stack: "stack",
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh", F.hardswish: "hardswish",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
    F.gelu: "gelu", F.silu: "silu", F.leaky_relu: "leaky_relu", F.hardsigmoid: "hardsigmoid", F.elu: "elu",
    F.embedding_bag: "embedding_bag",
    F.max_pool1d: "max_pool", F.max_pool2d: "max_pool", F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool",
    F.adaptive_avg_pool1d: "adaptive_avg_pool", F.adaptive_avg_pool2d: "adaptive_avg_pool",
    torch.max_pool1d: "max_pool", torch.max_pool2d: "max_pool", torch.avg_pool1d: "avg_pool",
    torch.adaptive_avg_pool1d: "adaptive_avg_pool",
    torch.flatten: "flatten", torch.reshape: "reshape", torch.permute: "permute",
    torch.transpose: "transpose", torch.chunk: "chunk", torch.split: "split", torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze", operator.getitem: "getitem", torch.unbind: "unbind",
    F.interpolate: "interpolate", F.softmax: "softmax", torch.softmax: "softmax",
    F.log_softmax: "log_softmax", torch.mean: "mean", torch.sum: "sum",
    F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d", F.linear: "linear",
    F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d", F.layer_norm: "layer_norm",
    F.group_norm: "group_norm", F.batch_norm: "batch_norm", F.dropout: "dropout", F.pad: "pad",
    F.scaled_dot_product_attention: "scaled_dot_product_attention", F.embedding: "embedding",
    torch.clamp: "clamp", torch.exp: "exp", torch.neg: "neg", operator.neg: "neg",
}

METHOD_OPS: dict[str, str] = {
    "add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "sub": "sub", "div": "div",
    "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "view": "view",
    "reshape": "reshape", "permute": "permute", "transpose": "transpose", "flatten": "flatten",
    "chunk": "chunk", "split": "split", "contiguous": "contiguous", "squeeze": "squeeze",
    "unsqueeze": "unsqueeze", "size": "size", "dim": "dim", "mean": "mean", "sum": "sum",
    "softmax": "softmax", "matmul": "matmul", "expand": "expand", "clamp": "clamp", "float": "float",
    "to": "to", "type_as": "type_as", "masked_fill": "masked_fill", "repeat": "repeat", "unbind": "unbind",
}


def op_of(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The plain op name of a node (``conv2d``, ``add``, ``flatten``...), or ``""`` for graph plumbing."""
    if node.op == "call_module":
        mod = modules[node.target]
        op = getattr(mod, "qcast_op", None)  # qcast's own fused/float modules say what they are
        if op:
            return op
        for cls in type(mod).__mro__:
            if cls in MODULE_OPS:
                return MODULE_OPS[cls]
        return type(mod).__name__
    if node.op == "call_function":
        if node.target in FUNCTION_OPS:
            return FUNCTION_OPS[node.target]
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return METHOD_OPS.get(node.target, node.target)
    return ""


# -------------------------------------------------------------------------------------------------
# tracing
# -------------------------------------------------------------------------------------------------
def _is_stub(m: nn.Module) -> bool:
    from torch.ao.quantization import DeQuantStub, QuantStub

    return isinstance(m, (QuantStub, DeQuantStub))


class QcastTracer(fx.Tracer):
    """torch.fx tracer that keeps standard layers and opaque (untraceable) user modules as leaves."""

    def __init__(self, opaque_ids: set[int] | None = None):
        super().__init__()
        self.opaque_ids = opaque_ids or set()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self.opaque_ids or _is_stub(m) or getattr(m, "qcast_leaf", False):
            return True
        return super().is_leaf_module(m, qualname)


#: the installed packages whose frames are never the user's code: qcast itself and torch, by where they are
#: installed (not by a substring of the path: a user's own project may well live in a folder called "qcast")
_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def _is_library_frame(filename: str) -> bool:
    return filename.startswith("<") or os.path.abspath(filename).startswith(_LIBRARY_DIRS)


def _user_frame(exc: BaseException) -> str:
    """file:line and source of the innermost frame of the user's code in an exception's traceback."""
    best = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if _is_library_frame(frame.filename):
            continue
        line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        best = f"{frame.filename}:{frame.lineno} `{line}`"
    return best


def _trace_reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = _user_frame(exc)
    return f"{type(exc).__name__}: {msg}" + (f" at {where}" if where else "")


def _concrete_args(model: nn.Module, provided: set[str]) -> dict[str, Any]:
    """Arguments of forward() the example does not provide are traced as their default values."""
    out = {}
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return out
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name not in provided and p.default is not inspect.Parameter.empty:
            out[name] = p.default
    return out


def _trace(root: nn.Module, opaque_ids: set[int], concrete: dict[str, Any] | None) -> fx.Graph:
    return QcastTracer(opaque_ids).trace(root, concrete_args=concrete or None)


def _find_opaque(model: nn.Module, concrete: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """Post-order: each module whose own forward fails to trace (children already leaves) is opaque."""
    opaque: dict[int, tuple[str, str]] = {}
    base = fx.Tracer()

    def visit(mod: nn.Module, path: str) -> None:
        for name, child in mod.named_children():
            cpath = f"{path}.{name}" if path else name
            if not base.is_leaf_module(child, cpath) and not _is_stub(child):
                visit(child, cpath)
        if not path:
            return
        try:
            _trace(mod, set(opaque), None)
        except Exception as e:  # noqa: BLE001 - any tracing failure makes the region opaque
            opaque[id(mod)] = (path, _trace_reason(e))

    visit(model, "")
    return opaque


@dataclass
class Captured:
    """The captured graph plus what could not be captured (module path -> reason)."""

    gm: fx.GraphModule
    opaque: dict[str, str] = field(default_factory=dict)
    input_names: tuple[str, ...] = ()
    via: str = "torch.fx"  # or "torch.export": see capture_export.py


def _kind(v: Any) -> str:
    return f"Tensor{list(v.shape)}:{str(v.dtype).replace('torch.', '')}" if isinstance(v, torch.Tensor) else type(v).__name__


def bind_inputs(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[str], list[Any]]:
    """Names and values of the forward() arguments an example provides, in signature order."""
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        hint = ""
        if len(args) == 2 and not kwargs and "too many positional" in str(e):  # a DataLoader's (input, label) batch
            hint = (f". Each item has 2 parts ({', '.join(_kind(a) for a in args)}): if they are (input, label) pairs, "
                    "pass input_fn=lambda batch: batch[0]")
        raise InputError(f"the input does not fit {type(model).__name__}.forward{sig}: {e}{hint}") from None
    return list(bound.arguments), list(bound.arguments.values())


def materialize_parametrizations(model: nn.Module) -> None:
    """Replace each ``torch.nn.utils.parametrize`` parametrization (weight_norm, spectral_norm, orthogonal...)
    by the tensor it computes, in place on ``model`` (a private eval-mode copy).

    In eval mode a parametrized weight is a fixed function of its originals, so the layer computes exactly
    what it did; afterwards it is the plain layer again (a ``ParametrizedConv2d`` becomes an ``nn.Conv2d``):
    a leaf of the trace that BN folding, fusion and the int8 kernels handle like any other, and the weight
    they quantize is the effective one.

    Not ``parametrize.remove_parametrizations``: it deletes the property from the injected
    ``Parametrized<Layer>`` class, which a deepcopy shares with the user's model (that would break theirs),
    and it may write into the original tensor in place. Here only the copy's own state changes.
    """
    from torch.nn.utils import parametrize

    for mod in [m for m in model.modules() if parametrize.is_parametrized(m)]:
        values = {}
        with torch.no_grad():
            for name, plist in mod.parametrizations.items():
                first = plist.original if plist.is_tensor else plist.original0
                values[name] = (getattr(mod, name).detach().clone(), isinstance(first, nn.Parameter))
        del mod._modules["parametrizations"]
        mod.__class__ = type(mod).__bases__[0]  # Parametrized<Layer> -> <Layer>, as remove_parametrizations does
        for name, (value, is_param) in values.items():
            if is_param:
                mod.register_parameter(name, nn.Parameter(value, requires_grad=False))
            else:
                mod.register_buffer(name, value)


def capture(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    """Trace ``model`` (already a private eval-mode copy) into a GraphModule with per-node metadata."""
    materialize_parametrizations(model)
    names, _ = bind_inputs(model, args, kwargs)
    concrete = _concrete_args(model, set(names))
    opaque_paths: dict[str, str] = {}
    try:
        graph = _trace(model, set(), concrete)
    except Exception as root_error:  # noqa: BLE001
        found = _find_opaque(model, concrete)
        try:
            graph = _trace(model, set(found), concrete)
        except Exception as e:  # noqa: BLE001
            fx_reason = _trace_reason(e)
            gm = _export_or_raise(model, args, kwargs, names, fx_reason, root_error)
            _annotate(gm)
            return Captured(gm=gm, opaque={}, input_names=tuple(names), via="torch.export")
        opaque_paths = {path: reason for path, reason in found.values()}
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Graph")
    _annotate(gm)
    return Captured(gm=gm, opaque=opaque_paths, input_names=tuple(names))


def _export_or_raise(model: nn.Module, args: tuple, kwargs: dict, names: list[str], fx_reason: str,
                     root_error: BaseException) -> fx.GraphModule:
    """The torch.export capture of a model whose top-level forward torch.fx cannot trace, or a CaptureError
    that gives both reasons and the fix."""
    from .capture_export import export_graph

    _, values = bind_inputs(model, args, kwargs)
    try:
        return export_graph(model, args, kwargs, names, values)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(
            f"the top-level forward() of {type(model).__name__} cannot be captured. torch.fx: {fx_reason}. "
            f"torch.export: {_trace_reason(e)}. Data-dependent Python control flow must live inside a submodule "
            "(which then runs in float) rather than in the top-level forward: move that branch into its own "
            "nn.Module, or quantize the traceable submodules separately."
        ) from root_error


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        return str(last[0] if isinstance(last, tuple) else last)
    return ""


def _annotate(gm: fx.GraphModule) -> None:
    """Give every node its op name, module path and a unique display name (``layer1.0:add``, ``relu#2``)."""
    modules = dict(gm.named_modules())
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        op = op_of(node, modules)
        path = _module_path(node)
        if node.op == "call_module":
            base = path
        elif node.op in ("call_function", "call_method"):
            base = f"{path}:{op}" if path else op
        else:
            base = node.name
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}#{seen[base]}"
        node.meta["qcast_op"] = op
        node.meta["qcast_path"] = path
        node.meta["qcast_name"] = name


def remove_stubs(gm: fx.GraphModule) -> None:
    """QuantStub/DeQuantStub left from earlier attempts, Identity and eval-mode Dropout are identities."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        drop = False
        if node.op == "call_module":
            mod = modules[node.target]
            drop = _is_stub(mod) or isinstance(mod, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                                                     nn.Dropout3d, nn.AlphaDropout))
        elif node.op == "call_function" and node.target in (F.dropout, F.dropout2d, F.dropout1d):
            drop = True
        if drop and node.args:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def propagate_shapes(gm: fx.GraphModule, values: list[Any]) -> Any:
    """Run the example through the graph, recording each node's output on ``node.meta['qcast_val']``.

    Only tensor *metadata* is kept (dtype, shape), and whether a value is a Python number
    (``node.meta['qcast_number']``). Raises InputError naming the node that failed.
    """
    env_vals: dict[fx.Node, Any] = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            try:
                out = super().run_node(n)
            except Exception as e:  # noqa: BLE001
                name = n.meta.get("qcast_name", n.name)
                raise InputError(
                    f"the example input does not fit the model: {name} ({n.meta.get('qcast_op', n.op)}) "
                    f"failed with {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                    "Pass inputs exactly as you would call model(...)."
                ) from e
            n.meta["qcast_val"] = _meta_of(out)
            # a Python number (a forward() argument, or computed from shapes): int8 kernels may take it at run time
            n.meta["qcast_number"] = isinstance(out, numbers.Real) and not isinstance(out, bool)
            return out

    with torch.no_grad():
        return _Rec(gm).run(*values)


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def _meta_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return TensorMeta(out.dtype, tuple(out.shape))
    if isinstance(out, torch.Size):
        return None
    if isinstance(out, (tuple, list)):
        return type(out)(_meta_of(o) for o in out) if not hasattr(out, "_fields") else tuple(_meta_of(o) for o in out)
    return None


def is_float_tensor(node: Any) -> bool:
    """Whether an fx node (from shape propagation) produces one floating-point tensor."""
    if not isinstance(node, fx.Node):
        return False
    meta = node.meta.get("qcast_val")
    return isinstance(meta, TensorMeta) and meta.is_float


__all__ = ["capture", "Captured", "op_of", "remove_stubs", "propagate_shapes", "is_float_tensor", "bind_inputs"]
