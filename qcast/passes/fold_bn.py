"""Fold BatchNorm into the conv/linear before it.

Pattern (forward order): ``conv1d|conv2d|conv3d|conv_transpose1d|conv_transpose2d|linear -> batch_norm``, when the conv's output feeds only the BN
and the conv module is called at one place. A BN that cannot be folded stays in the graph with the reason in
``node.meta["qcast_unfolded"]``: it then runs as its own int8 op where a kernel takes it (``kernels/norm.py``),
else in float, and ``explain()`` says why either way.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ._util import call_sites, finish, only_user, set_module

PATTERNS = [((nn.Conv1d, nn.Conv2d), (nn.BatchNorm1d, nn.BatchNorm2d)), ((nn.Conv3d,), (nn.BatchNorm3d,)),
            ((nn.ConvTranspose1d, nn.ConvTranspose2d), (nn.BatchNorm1d, nn.BatchNorm2d)),
            ((nn.Linear,), (nn.BatchNorm1d,))]


def fold_bn(gm: fx.GraphModule, keep: bool = False) -> fx.GraphModule:
    """``keep``: the unfolded conv and its BatchNorm of each fold go to ``gm.meta['qcast_bn_sources']`` (module path
    -> (conv, bn)), for QAT, which trains them and folds as it goes (``qcast/qat.py``)."""
    modules = dict(gm.named_modules())
    sites = call_sites(gm)
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or not isinstance(modules.get(bn_node.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn = modules[bn_node.target]
        src = bn_node.args[0] if bn_node.args else None
        reason = _why_not(src, bn, modules, sites)
        if reason:
            bn_node.meta["qcast_unfolded"] = reason
            continue
        conv = modules[src.target]
        fused = fuse_linear_bn_eval(conv, bn) if isinstance(conv, nn.Linear) else fuse_conv_bn_eval(
            conv, bn, transpose=isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d)))
        if keep:
            gm.meta.setdefault("qcast_bn_sources", {})[src.target] = (conv, bn)
        set_module(gm, src.target, fused)
        modules[src.target] = fused
        src.meta.setdefault("qcast_folded", []).append(bn_node.meta.get("qcast_name", bn_node.target))
        bn_node.replace_all_uses_with(src)
        gm.graph.erase_node(bn_node)
    finish(gm)
    return gm


def _why_not(src, bn, modules, sites) -> str | None:
    if not isinstance(src, fx.Node) or src.op != "call_module":
        return "BatchNorm is not directly after a conv/linear it could be folded into"
    conv = modules[src.target]
    if not any(isinstance(conv, c) and isinstance(bn, b) for c, b in PATTERNS):
        return f"BatchNorm follows {type(conv).__name__} '{src.target}', which it cannot be folded into"
    if only_user(src) is None:
        return f"the output of '{src.target}' is also used elsewhere, so the BatchNorm cannot be folded"
    if sites.get(src.target, 0) != 1:
        return f"'{src.target}' is called at several places, so the BatchNorm cannot be folded"
    if not bn.track_running_stats or bn.running_mean is None:
        return "BatchNorm without running statistics cannot be folded"
    return None
