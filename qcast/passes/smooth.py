"""SmoothQuant insertion: ``x -> linear`` becomes ``x -> Smooth(inv_s) -> linear`` for each candidate int8 linear.

The ``Smooth`` module (``qcast.smooth``) is the identity until ``qcast.calibrate()`` chooses its per-channel scales
from the data (and multiplies the linear's weight columns by them); this pass only places it, at prepare time after
``fuse``, so the plan keeps it float (``node.meta['qcast_float_reason']``) and the linear's input observer lands after
it. The migration strength is ``QuantConfig.smoothquant`` (or a ``per_layer`` override of it); ``None`` turns it off.

Candidates: an ``nn.Linear`` (or a ``FusedConv`` around one, e.g. linear+relu) called at one place only, whose
weight is not shared with another module or read by a ``get_attr`` (tied weights: rescaling its columns would change
the other user), that the config does not keep in float, with a floating-point input whose last dimension is the
layer's ``in_features``; with ``"auto"``, an input of 3+ dims (a token sequence: transformer linears, not the
classifier head of a CNN).
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..capture import TensorMeta
from ..config import QuantConfig
from ..nn import FusedConv
from ..smooth import AUTO_ALPHA, Smooth
from ._util import call_sites
from .equalize import _shared_tensors
from .fuse import _kept_float


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def smooth(gm: fx.GraphModule, config: QuantConfig) -> int:
    """Insert a ``Smooth`` before every candidate linear of ``gm`` (in place); returns how many were inserted."""
    modules = dict(gm.named_modules())
    sites = call_sites(gm)
    shared = None  # computed on the first candidate only: most models have smoothquant off or no linear
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        mod = modules[node.target]
        lin = mod.conv if isinstance(mod, FusedConv) and not mod.add else mod
        if not isinstance(lin, nn.Linear):
            continue
        name, op, path = node.meta.get("qcast_name", node.target), node.meta.get("qcast_op", ""), node.meta.get("qcast_path", "")
        alpha = config.setting("smoothquant", name, op, path)
        if not alpha or sites.get(node.target) != 1 or _kept_float(node, config):
            continue
        x = node.args[0]
        meta = x.meta.get("qcast_val")
        if not (isinstance(meta, TensorMeta) and meta.is_float and meta.shape and meta.shape[-1] == lin.in_features):
            continue
        if alpha == "auto":  # transformer linears only: a token sequence [..., tokens, channels]
            if len(meta.shape) < 3:
                continue
            alpha = AUTO_ALPHA
        if shared is None:
            shared = _shared_tensors(gm)
        if id(lin.weight) in shared or id(lin) in shared or id(mod) in shared:
            continue
        target = f"qcast_smooth_{_safe(node.target)}"
        gm.add_submodule(target, Smooth(lin.in_features, alpha, layer=name, target=node.target))
        with gm.graph.inserting_before(node):
            s = gm.graph.call_module(target, (x,))
        s.meta.update({"qcast_op": "smooth", "qcast_name": f"{name}:smooth", "qcast_path": path, "qcast_val": meta,
                       "qcast_float_reason": f"SmoothQuant: per-channel scale moved into the weights of {name}"})
        node.replace_input_with(x, s)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
