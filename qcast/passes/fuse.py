"""Fuse activations and residual adds into the conv/linear before them.

Rules, in forward order (each a pattern the graph is scanned for):

* ``conv1d|conv2d|conv3d|linear -> relu|relu6``     -> FusedConv(act)
* ``conv2d -> add(·, other) [-> relu]``             -> FusedConv(add=True, act) (onednn conv2d_add[_relu])
* ``add(a, b) -> relu``                             -> add_relu (one int8 kernel)
* ``batch_norm (not folded) -> relu``               -> FusedBatchNorm (quantized::batch_norm_relu)

A producer whose output has other users, a module called at several places, or a node the config keeps in
float is left alone. Hardswish is not fused: its int8 kernel runs right after the conv.

The residual add needs the shapes of shape propagation (``node.meta['qcast_val']``): onednn's conv2d_add
writes the conv output into the accumulator's buffer, so ``other`` must be an activation computed by the
graph (not a parameter/buffer, which it would overwrite) with exactly the conv output's shape and float
dtype (a broadcast operand would be written out of bounds), must not be the conv output itself, and the
backend must run conv + add as one int8 op for the engine the config gives the conv: the caller passes the rule the
backend declares (``Backend.conv_add``; the torch backend: oneDNN's conv2d_add, so engine ``onednn`` or ``auto``;
never ONNX Runtime, whose QDQ fusion needs the conv output quantized). This pass imports no backend. Otherwise the add stays a separate op (int8 when its kernel accepts it).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture import TensorMeta
from ..config import QuantConfig
from ..nn import FusedBatchNorm, FusedConv, add_relu
from ._util import call_sites, finish, only_user, set_module

BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ADD_TARGETS = (operator.add, torch.add, operator.iadd)


def _act_name(node: fx.Node, modules) -> str | None:
    """'relu' / 'relu6' if the node is that activation applied to its first argument, else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.ReLU:
            return "relu"
        if type(m) is nn.ReLU6 or (type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0)):
            return "relu6"
        return None
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, torch.relu_):
            return "relu"
        if node.target is F.relu6:
            return "relu6"
        if node.target is F.hardtanh:
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
            return "relu6" if (lo, hi) == (0.0, 6.0) else None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def _kept_float(node: fx.Node, config: QuantConfig) -> bool:
    name, op, path = node.meta.get("qcast_name", ""), node.meta.get("qcast_op", ""), node.meta.get("qcast_path", "")
    return bool(config.skipped_by(name, op, path)) or config.setting("activation", name, op, path) == "float"


def _add_engine_ok(conv: fx.Node, config: QuantConfig, conv_add) -> bool:
    """Whether the backend runs this conv and the residual add after it as one int8 op: ``conv_add(engine)``, the rule
    the backend declares (``backends.conv_add_rule``; e.g. the torch backend's oneDNN conv2d_add), given the engine
    the config asks for this conv. No rule: no conv + add fusion (this pass knows no backend)."""
    if conv_add is None:
        return False
    name, op, path = conv.meta.get("qcast_name", ""), conv.meta.get("qcast_op", ""), conv.meta.get("qcast_path", "")
    return bool(conv_add(config.setting("engine", name, op, path)))


def _accumulator_ok(conv: fx.Node, other: fx.Node) -> bool:
    """Whether ``other`` may be conv2d_add's accumulator: an activation with the conv output's shape and dtype."""
    if other is conv or other.op == "get_attr":
        return False
    out, acc = conv.meta.get("qcast_val"), other.meta.get("qcast_val")
    return isinstance(out, TensorMeta) and out.is_float and acc == out


def _record(dst: fx.Node, src: fx.Node) -> None:
    dst.meta.setdefault("qcast_fused_names", []).append(src.meta.get("qcast_name", src.name))


def fuse(gm: fx.GraphModule, config: QuantConfig | None = None, conv_add=None) -> fx.GraphModule:
    """Fuse in place. ``conv_add(engine) -> bool``: whether the backend runs conv + residual add as one op (the
    backend's declared rule, ``qcast.backends.conv_add_rule``); None fuses no residual add."""
    config = config or QuantConfig()
    modules = dict(gm.named_modules())
    sites = call_sites(gm)

    def fusable_base(node) -> nn.Module | None:
        if not isinstance(node, fx.Node) or node.op != "call_module" or sites.get(node.target) != 1:
            return None
        if _kept_float(node, config):
            return None
        m = modules[node.target]
        return m if isinstance(m, BASES + (FusedConv,)) else None

    # 1. conv2d -> add(., other) [-> relu]
    for add in list(gm.graph.nodes):
        if add.op != "call_function" or add.target not in ADD_TARGETS or len(add.args) != 2 or add.kwargs:
            continue
        if _kept_float(add, config):
            continue
        a, b = add.args
        if a is b:  # y + y: the conv output is both operands
            continue
        cands = [(x, o) for x, o in ((a, b), (b, a)) if isinstance(o, fx.Node) and isinstance(x, fx.Node)
                 and only_user(x) is add
                 and isinstance(fusable_base(x), nn.Conv2d)
                 and _accumulator_ok(x, o) and _add_engine_ok(x, config, conv_add)]
        if not cands:
            continue
        # the operand computed last is the fused conv; the other one is ready as the accumulator
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        conv_node, other = max(cands, key=lambda c: order[c[0]])
        act = None
        relu = only_user(add)
        if relu is not None and _act_name(relu, modules) == "relu" and relu.args[0] is add and not _kept_float(relu, config):
            act = "relu"
        fused = FusedConv(modules[conv_node.target], act=act, add=True)
        set_module(gm, conv_node.target, fused)
        modules[conv_node.target] = fused
        last = relu if act else add
        with gm.graph.inserting_before(add):
            new = gm.graph.call_module(conv_node.target, (conv_node.args[0], other))
        new.meta.update(conv_node.meta)
        _record(new, add)
        if act:
            _record(new, relu)
        last.replace_all_uses_with(new)
        for dead in ([relu] if act else []) + [add, conv_node]:
            gm.graph.erase_node(dead)

    # 2. conv/linear -> relu|relu6
    for act_node in list(gm.graph.nodes):
        act = _act_name(act_node, modules)
        if act is None or not act_node.args or _kept_float(act_node, config):
            continue
        src = act_node.args[0]
        base = fusable_base(src)
        if base is None or only_user(src) is not act_node:
            continue
        if isinstance(base, FusedConv):
            if base.act is not None:
                continue
            base.act = act
        else:
            set_module(gm, src.target, FusedConv(base, act=act))
            modules[src.target] = gm.get_submodule(src.target)
        _record(src, act_node)
        act_node.replace_all_uses_with(src)
        gm.graph.erase_node(act_node)

    # 3. add -> relu (both tensors)
    for relu in list(gm.graph.nodes):
        if _act_name(relu, modules) != "relu" or not relu.args or _kept_float(relu, config):
            continue
        add = relu.args[0]
        if (not isinstance(add, fx.Node) or add.op != "call_function" or add.target not in ADD_TARGETS
                or only_user(add) is not relu or add.kwargs or _kept_float(add, config)):
            continue
        if not all(isinstance(x, fx.Node) for x in add.args[:2]):
            continue
        add.target = add_relu
        _record(add, relu)
        relu.replace_all_uses_with(add)
        gm.graph.erase_node(relu)

    # 4. batch_norm (left by fold_bn) -> relu
    for relu in list(gm.graph.nodes):
        if _act_name(relu, modules) != "relu" or not relu.args or _kept_float(relu, config):
            continue
        bn_node = relu.args[0]
        if (not isinstance(bn_node, fx.Node) or bn_node.op != "call_module" or sites.get(bn_node.target) != 1
                or type(modules.get(bn_node.target)) not in (nn.BatchNorm1d, nn.BatchNorm2d)
                or only_user(bn_node) is not relu or _kept_float(bn_node, config)):
            continue
        fused = FusedBatchNorm(modules[bn_node.target])
        set_module(gm, bn_node.target, fused)
        modules[bn_node.target] = fused
        _record(bn_node, relu)
        relu.replace_all_uses_with(bn_node)
        gm.graph.erase_node(relu)

    finish(gm)
    return gm
