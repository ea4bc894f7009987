"""Fold values computed only from parameters/buffers into constants.

Pattern: a ``call_function`` / ``call_method`` node whose every graph input is a constant (a ``get_attr``,
or a node already folded), e.g. ``self.scale.view(1, -1, 1, 1)``, ``self.gamma * self.alpha``,
``torch.exp(self.log_scale)``. It is evaluated once on qcast's private copy and replaced by a ``get_attr`` of
the result, so the op it feeds sees a constant operand (which ``add``/``mul`` run in int8) instead of a float
subgraph. Nodes with no graph input (``torch.randn(3)``, ``torch.arange(n)``), in-place methods and results
that are not tensors are left alone.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture import attr_at
from ._util import finish


def _folding_candidate(node: fx.Node, constant: set[fx.Node]) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    if node.op == "call_method" and str(node.target).endswith("_"):
        return False  # in-place: would edit a parameter
    inputs = node.all_input_nodes
    return bool(inputs) and all(i in constant for i in inputs)


def fold_constants(gm: fx.GraphModule) -> fx.GraphModule:
    constant = {n for n in gm.graph.nodes if n.op == "get_attr"}
    values: dict[fx.Node, object] = {}

    def value(n: fx.Node):
        if n not in values:
            values[n] = attr_at(gm, n.target)
        return values[n]

    folded = 0
    for node in list(gm.graph.nodes):
        if not _folding_candidate(node, constant):
            continue
        args = fx.map_arg(node.args, value)
        kwargs = fx.map_arg(node.kwargs, value)
        with torch.no_grad():
            if node.op == "call_function":
                out = node.target(*args, **kwargs)
            else:
                self_obj, *rest = args
                out = getattr(self_obj, node.target)(*rest, **kwargs)
        if not isinstance(out, torch.Tensor):
            continue
        base = "_".join(str(i.target).replace(".", "_") for i in node.all_input_nodes if i.op == "get_attr")
        target = f"qcast_const_{base or 'value'}_{folded}"
        folded += 1
        gm.register_buffer(target, out.detach().clone(memory_format=torch.contiguous_format))
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(target)
        const.meta.update({k: v for k, v in node.meta.items() if k.startswith("qcast_")})
        const.meta["qcast_folded_from"] = node.meta.get("qcast_name", node.name)
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
        constant.add(const)
        values[const] = out
    if folded:
        for n in list(gm.graph.nodes):  # the attributes read only by what was folded
            if n.op == "get_attr" and not n.users:
                gm.graph.erase_node(n)
        finish(gm)
    return gm
