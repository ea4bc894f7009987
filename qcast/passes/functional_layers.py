"""Functional layers whose weight belongs to the model become the standard layer that computes the same thing.

Patterns (``weight`` a ``get_attr`` node: a parameter or buffer of the model, or a constant ``fold_constants`` made of
one, such as ``self.w.t()``):

* ``F.conv1d|conv2d|conv3d(x, weight[, bias], stride, padding, dilation, groups)``      -> ``nn.Conv1d|2d|3d``
* ``F.conv_transpose1d|2d(x, weight[, bias], stride, padding, output_padding, groups, dilation)``
                                                                                       -> ``nn.ConvTranspose1d|2d``
* ``F.linear(x, weight[, bias])``                                                      -> ``nn.Linear``
* ``torch.matmul(x, weight)``, ``x @ weight``, ``x.matmul(weight)`` with a 2-D weight  -> ``nn.Linear`` (weight
  ``weight.t()``, no bias); ``x @ self.w.t()`` reaches here as ``x @ const`` once ``fold_constants`` has run

The call node becomes a ``call_module`` of a new module added under the owning module's path
(``<owner>.qcast_conv2d``), with the same weight tensor (the parameter object itself when nothing else reads it)
and the call's own arguments as the layer's settings. The node keeps its metadata, so ``explain()``/``compare()``
still name it as captured (``block:conv2d``) and every later stage (``fold_bn``, ``fuse``, plan, observers,
AdaRound, sensitivity) treats it as the layer it now is. A call left functional (a weight computed at run time from
an input, non-constant settings, a non-float32 weight) keeps the reason in ``node.meta['qcast_functional']`` for
``explain()``. This pass imports no backend.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture import attr_at
from ._util import finish

CONVS = {F.conv1d: (nn.Conv1d, 1), F.conv2d: (nn.Conv2d, 2), F.conv3d: (nn.Conv3d, 3),
         F.conv_transpose1d: (nn.ConvTranspose1d, 1), F.conv_transpose2d: (nn.ConvTranspose2d, 2)}
TRANSPOSED = (F.conv_transpose1d, F.conv_transpose2d)
MATMULS = (torch.matmul, operator.matmul)
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
LINEAR_ARGS = ("input", "weight", "bias")


def _bind(node: fx.Node, names: tuple[str, ...]) -> dict:
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _kind(node: fx.Node) -> str | None:
    if node.op == "call_function":
        if node.target in CONVS:
            return "conv"
        if node.target is F.linear:
            return "linear"
        if node.target in MATMULS:
            return "matmul"
    if node.op == "call_method" and node.target == "matmul":
        return "matmul"
    return None


def _constant(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    """The tensor a ``get_attr`` argument reads, else None."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = attr_at(gm, arg.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _why_not(gm: fx.GraphModule, node: fx.Node, kind: str, bound: dict) -> str | None:
    """Why this functional call cannot become a layer (None: it can)."""
    x, weight = bound.get("input"), bound.get("weight")
    if not isinstance(x, fx.Node):
        return "its input is not a traced tensor"
    w = _constant(gm, weight)
    if w is None:
        what = "the second operand" if kind == "matmul" else "the weight"
        return (f"{what} is computed at run time (from an input, not a parameter or buffer of the model), so there is "
                "no fixed weight to quantize ahead of time: it runs in float")
    if w.dtype != torch.float32:
        return f"its weight is {w.dtype}, not float32"
    bias = bound.get("bias")
    if bias is not None and (_constant(gm, bias) is None or _constant(gm, bias).dtype != torch.float32):
        return "its bias is computed at run time (not a float32 parameter or buffer of the model)"
    found: list[fx.Node] = []
    fx.node.map_arg([v for k, v in bound.items() if k not in ("input", "weight", "bias")], found.append)
    if found:
        return "its stride/padding/dilation/groups are computed at run time"
    if kind == "conv":
        _, dims = CONVS[node.target]
        if w.dim() != dims + 2:
            return f"its weight has rank {w.dim()}, not {dims + 2}"
    elif w.dim() != 2:
        return f"its weight has rank {w.dim()}, not 2"
    return None


def _padding(padding, w: torch.Tensor, dilation, dims: int):
    """Explicit padding for the string forms where it is one: 'valid' -> 0; 'same' -> d * (k - 1) / 2 where that is
    whole on every side (odd effective kernels; else the string stays and the conv kernel says why)."""
    if padding == "valid":
        return 0
    if padding == "same":
        dil = dilation if isinstance(dilation, (list, tuple)) else (dilation,) * dims
        total = [d * (k - 1) for d, k in zip(dil, w.shape[2:])]
        if all(t % 2 == 0 for t in total):
            return tuple(t // 2 for t in total)
    return padding


def _layer(node: fx.Node, kind: str, bound: dict, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    if kind == "conv" and node.target in TRANSPOSED:
        cls, _ = CONVS[node.target]
        groups = int(bound.get("groups", 1))
        layer = cls(w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]), stride=bound.get("stride", 1),
                    padding=bound.get("padding", 0), output_padding=bound.get("output_padding", 0), groups=groups,
                    bias=b is not None, dilation=bound.get("dilation", 1))
    elif kind == "conv":
        cls, dims = CONVS[node.target]
        groups = int(bound.get("groups", 1))
        stride, dilation = bound.get("stride", 1), bound.get("dilation", 1)
        padding = _padding(bound.get("padding", 0), w, dilation, dims)
        layer = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding,
                    dilation=dilation, groups=groups, bias=b is not None)
    elif kind == "linear":
        layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        layer = nn.Linear(w.shape[0], w.shape[1], bias=False)
    return layer


def _param(t: torch.Tensor, share: bool) -> nn.Parameter:
    if share and isinstance(t, nn.Parameter):
        return t
    return nn.Parameter(t.detach() if share else t.detach().clone(), requires_grad=False)


def functional_layers(gm: fx.GraphModule) -> int:
    """Rewrite the functional conv/linear/matmul calls with a model-owned weight into layers; the number rewritten."""
    done = 0
    for node in list(gm.graph.nodes):
        kind = _kind(node)
        if kind is None:
            continue
        if kind == "matmul":
            bound = _bind(node, ("input", "weight"))
            if _constant(gm, bound.get("weight")) is None or _constant(gm, bound.get("input")) is not None:
                continue  # activation @ activation (the matmul kernel's), or parameter @ activation
        else:
            bound = _bind(node, (CONV_T_ARGS if node.target in TRANSPOSED else CONV_ARGS) if kind == "conv"
                          else LINEAR_ARGS)
        reason = _why_not(gm, node, kind, bound)
        weight_node, bias_node = bound.get("weight"), bound.get("bias")
        w, b = _constant(gm, weight_node), _constant(gm, bias_node)
        if not reason:
            try:
                layer = _layer(node, kind, bound, w, b)
            except (ValueError, TypeError, RuntimeError) as e:  # settings the layer class refuses
                reason = f"its settings make no nn layer ({str(e).splitlines()[0]})"
        if reason:
            node.meta["qcast_functional"] = reason
            continue
        alone = len(weight_node.users) == 1  # nothing else reads the weight: the layer may hold the tensor itself
        if kind == "matmul":
            layer.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=False)
        else:
            layer.weight = _param(w, alone)
            if b is not None:
                layer.bias = _param(b, len(bias_node.users) == 1)
        layer.requires_grad_(False)
        layer.train(gm.training)
        owner = node.meta.get("qcast_path", "")
        op = node.meta.get("qcast_op", kind)
        base = f"{owner}.qcast_{op}" if owner else f"qcast_{op}"
        target, i = base, 1
        while _exists(gm, target):
            i += 1
            target = f"{base}_{i}"
        gm.add_submodule(target, layer)
        node.op, node.target = "call_module", target
        node.args, node.kwargs = (bound["input"],), {}
        node.meta["qcast_functional_from"] = "x @ weight" if kind == "matmul" else f"F.{op}"
        if kind == "matmul":  # its name stays 'matmul' (explain, compare, skip patterns); it runs as the linear it is
            node.meta["qcast_op"] = "linear"
        done += 1
    if done:
        for n in list(gm.graph.nodes):  # weights read only by the calls rewritten: they now live in the layers
            if n.op == "get_attr" and not n.users:
                gm.graph.erase_node(n)
                if not any(m.op == "get_attr" and m.target == n.target for m in gm.graph.nodes):
                    _drop_attr(gm, n.target)  # one name per tensor (exports name a weight by its first name)
        finish(gm)
    return done


def _exists(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_submodule(target)
        return True
    except AttributeError:
        return False


def _drop_attr(gm: fx.GraphModule, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in owner._parameters:
        del owner._parameters[name]
    elif name in owner._buffers:
        del owner._buffers[name]
