"""``Ctx``: what a backend's kernels may ask about the graph while the pipeline plans it and while the backend lowers
it (the module a node calls, its traced shape, its op name, the config's setting for it, its plan, its calibrated
output params). The pipeline (``plan.py``, ``prepare.py``, ``convert.py``) builds one and hands it down; kernels
never import the pipeline.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..capture import TensorMeta
from ..config import QuantConfig
from ..nn import FusedConv


class Ctx:
    """What kernels may ask about the graph while planning and lowering."""

    def __init__(self, gm: fx.GraphModule, config: QuantConfig, qparams: dict | None = None):
        self.gm, self.config = gm, config
        self.modules = dict(gm.named_modules())
        self.qparams = qparams or {}
        # the kernel table that plans this backend's graph (OpenVINO executes the plan of the torch kernels)
        from . import kernel_table
        self.kernels = kernel_table(config.backend)

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    @staticmethod
    def meta(node) -> TensorMeta | None:
        v = node.meta.get("qcast_val") if isinstance(node, fx.Node) else None
        return v if isinstance(v, TensorMeta) else None

    @staticmethod
    def op(node: fx.Node) -> str:
        return node.meta.get("qcast_op", "")

    @staticmethod
    def plan(node: fx.Node):
        """The node's ``qcast.plan.Plan`` (set by planning), or None."""
        return node.meta.get("qcast_plan")

    def setting(self, node: fx.Node, key: str):
        return self.config.setting(key, node.meta.get("qcast_name", ""), self.op(node), node.meta.get("qcast_path", ""))

    def out_qparams(self, node: fx.Node):
        return self.qparams[node]


def is_int8(node) -> bool:
    """Whether the node's value is an int8 tensor (a ``weight_only`` op, e.g. an embedding, has int8 weights only)."""
    p = node.meta.get("qcast_plan") if isinstance(node, fx.Node) else None
    return p is not None and p.precision == "int8" and p.kind != "weight_only"


def int8_layers(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """Module path -> conv/linear (a FusedConv's inner one) of every int8 conv/linear call in ``gm``."""
    out = {}
    for node in gm.graph.nodes:
        if is_int8(node) and node.op == "call_module":
            mod = gm.get_submodule(node.target)
            conv = mod.conv if isinstance(mod, FusedConv) else mod
            if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                out[node.target] = conv
    return out


def transposed_layers(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """Module path -> nn.ConvTranspose1d/2d of every int8 transposed conv in ``gm`` (per-tensor int8 weights:
    ``kernels/conv_transpose.py``)."""
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if is_int8(n) and n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), (nn.ConvTranspose1d, nn.ConvTranspose2d))}


def dynamic_linears(gm: fx.GraphModule) -> dict[str, nn.Linear]:
    """Module path -> nn.Linear of every per-token dynamic linear (``linear:dynamic`` plan) in ``gm``. In the QDQ graph
    such a linear is float in, float out, with its float weight: each backend decides how it runs it int8 (torch:
    ``kernels/dynamic.py``; OpenVINO: a weight-compressed linear it quantizes per token at run time; ONNX Runtime has
    no per-token int8 linear and runs it in float, which its explain() says)."""
    out = {}
    for node in gm.graph.nodes:
        plan = Ctx.plan(node)
        if node.op == "call_module" and plan is not None and plan.precision == "int8" and plan.kernel is not None \
                and plan.kernel.op == "linear:dynamic":
            mod = gm.get_submodule(node.target)
            out[node.target] = mod.conv if isinstance(mod, FusedConv) else mod
    return out

