"""Capture through ``torch.export`` when torch.fx cannot trace the top-level forward.

torch.fx stops at Python it cannot trace in the *top-level* forward: Hugging Face models are the common case
(decorators that rewrite ``**kwargs``, attention-mask builders that branch on tensor values, the attention
implementation picked at run time). ``torch.export`` (dynamo, non-strict) captures those models whole. Its graph
is ATen-level, so this module turns it back into the graph the rest of qcast works on:

- an ATen call inside a standard layer (``aten.linear`` whose module stack ends in an ``nn.Linear`` holding that
  weight, likewise LayerNorm, Embedding, Conv, BatchNorm) becomes a ``call_module`` of that layer again, so rows and
  errors name ``encoder.layer.0.attention.self.query`` and the int8 kernels see the layer they know;
- other ATen ops become their ``torch`` / ``operator`` / ``F`` counterparts (``aten.add.Tensor`` -> ``operator.add``,
  ``aten.scaled_dot_product_attention`` -> ``F.scaled_dot_product_attention``), the names the kernel registry uses;
  ops with no counterpart stay as ATen calls and run in float (``explain()`` names them);
- eval-mode dropout is removed;
- every input dimension is exported as dynamic (``Dim.AUTO``), so the quantized model runs at other batch sizes and
  sequence lengths than calibration used; the output keeps its structure (e.g. a ``BaseModelOutput``) through the
  exported graph's pytree code generation.
"""
from __future__ import annotations

import contextlib
import io
import logging
import operator
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .capture import attr_at

aten = torch.ops.aten

#: ATen op -> the callable qcast's op tables and kernels know (same argument order)
ATEN_FUNCTIONS: dict[Any, Any] = {
    aten.add.Tensor: operator.add, aten.add.Scalar: operator.add,
    aten.mul.Tensor: operator.mul, aten.mul.Scalar: operator.mul,
    aten.sub.Tensor: operator.sub, aten.div.Tensor: operator.truediv, aten.div.Scalar: operator.truediv,
    aten.matmul.default: torch.matmul, aten.bmm.default: torch.bmm, aten.mm.default: torch.matmul,
    aten.softmax.int: torch.softmax,
    aten.gelu.default: F.gelu, aten.tanh.default: torch.tanh, aten.sigmoid.default: torch.sigmoid,
    aten.relu.default: torch.relu, aten.relu_.default: torch.relu, aten.hardtanh.default: F.hardtanh,
    aten.silu.default: F.silu, aten.hardswish.default: F.hardswish,
    aten.reshape.default: torch.reshape, aten.transpose.int: torch.transpose, aten.permute.default: torch.permute,
    aten.unsqueeze.default: torch.unsqueeze, aten.squeeze.dim: torch.squeeze, aten.flatten.using_ints: torch.flatten,
    aten.cat.default: torch.cat, aten.mean.dim: torch.mean,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    aten.max_pool2d.default: F.max_pool2d, aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.clamp.default: torch.clamp, aten.split.Tensor: torch.split, aten.chunk.default: torch.chunk,
    aten.layer_norm.default: F.layer_norm,
}
#: ATen op -> tensor method name
ATEN_METHODS: dict[Any, str] = {aten.view.default: "view", aten.contiguous.default: "contiguous"}
#: ATen ops that are the identity in eval mode
ATEN_IDENTITY = {aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default,
                 aten.alpha_dropout.default, aten.clone.default}
#: ATen op -> (layer types it belongs to, index of the weight argument, index of the activation argument)
ATEN_LAYERS: dict[Any, tuple[tuple[type, ...], int, int]] = {
    aten.linear.default: ((nn.Linear,), 1, 0),
    aten.layer_norm.default: ((nn.LayerNorm,), 2, 0),
    aten.embedding.default: ((nn.Embedding,), 0, 1),
    aten.conv1d.default: ((nn.Conv1d,), 1, 0),
    aten.conv2d.default: ((nn.Conv2d,), 1, 0),
}


def _dynamic_shapes(names: list[str], values: list[Any]) -> dict[str, Any]:
    from torch.export import Dim
    import torch.utils._pytree as pytree

    def spec(v):
        return {i: Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) and v.dim() else None

    return {n: pytree.tree_map(spec, v) for n, v in zip(names, values)}


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs each failed guard with the whole traced program (pages on stderr) before raising; qcast
    reports the failure itself (a CaptureError, or fx's reason), so those loggers are raised to ERROR meanwhile and
    stderr is held back."""
    names = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo",
             "torch._subclasses.fake_tensor", "torch._functorch")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        # torch.export also print()s the partial graph of a failed export to stderr (export/_trace.py)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_graph(model: nn.Module, args: tuple, kwargs: dict, names: list[str], values: list[Any]) -> fx.GraphModule:
    """``torch.export`` ``model`` (non-strict, every input dimension dynamic, else static with a warning) and return
    the graph translated to qcast's vocabulary, as a GraphModule rooted at ``model``."""
    dyn_error = None
    with _quiet_torch_logs():
        try:
            ep = torch.export.export(model, tuple(args), dict(kwargs), dynamic_shapes=_dynamic_shapes(names, values),
                                     strict=False)
        except Exception as e:  # noqa: BLE001 - retry without dynamic dims before giving up
            ep, dyn_error = None, e
        if ep is None:
            ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    if dyn_error is not None:
        warnings.warn(f"{type(model).__name__} was captured with torch.export at fixed input shapes "
                      f"(dynamic shapes failed: {str(dyn_error).splitlines()[0][:200]}); the quantized model runs "
                      "only at the calibration shapes", stacklevel=3)
    exported = ep.module()
    graph = exported.graph
    _to_qcast_ops(graph, model, exported)
    graph.eliminate_dead_code()
    graph.lint()
    # constants export lifted out of the code (not parameters/buffers of the model) move onto the root
    for n in graph.nodes:
        if n.op == "get_attr" and not _has_attr(model, n.target):
            _set_attr(model, n.target, attr_at(exported, n.target))
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Graph")
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(exported, attr):
            setattr(gm, attr, getattr(exported, attr))
    gm.recompile()
    return gm


def _has_attr(root: nn.Module, target: str) -> bool:
    try:
        attr_at(root, target)
        return True
    except AttributeError:
        return False


def _set_attr(root: nn.Module, target: str, value: Any) -> None:
    *parents, last = target.split(".")
    obj = root
    for part in parents:
        if not hasattr(obj, part):
            obj.add_module(part, nn.Module())
        obj = getattr(obj, part)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        obj.register_buffer(last, value)
    else:
        setattr(obj, last, value)


def _owning_layer(node: fx.Node, model: nn.Module) -> tuple[str, nn.Module] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    try:
        return path, model.get_submodule(path)
    except AttributeError:
        return None


def _to_qcast_ops(graph: fx.Graph, model: nn.Module, exported: nn.Module) -> None:
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") and not node.users:
            graph.erase_node(node)  # export's input-shape guard: the int8 model checks inputs itself
            continue
        if node.op != "call_function":
            continue
        target = node.target
        if target in ATEN_IDENTITY and node.args:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        if target in ATEN_LAYERS:
            types, w_idx, x_idx = ATEN_LAYERS[target]
            owner = _owning_layer(node, model)
            weight = node.args[w_idx] if len(node.args) > w_idx else None
            if (owner and isinstance(owner[1], types) and isinstance(weight, fx.Node) and weight.op == "get_attr"
                    and weight.target == f"{owner[0]}.weight"
                    and getattr(owner[1], "padding_mode", "zeros") == "zeros"):
                with graph.inserting_before(node):
                    new = graph.call_module(owner[0], (node.args[x_idx],))
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                continue
        if target in ATEN_FUNCTIONS:
            node.target = ATEN_FUNCTIONS[target]
            if node.target is operator.add and node.kwargs.get("alpha", 1) != 1:
                node.target = target  # alpha != 1 has no plain counterpart: keep the ATen op
            elif node.target is F.layer_norm:
                node.args = node.args[:5]  # aten's trailing cudnn_enable flag
        elif target in ATEN_METHODS:
            node.op, node.target = "call_method", ATEN_METHODS[target]
