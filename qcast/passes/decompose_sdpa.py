"""Rewrite ``F.scaled_dot_product_attention`` into the ops it computes (backend-free; needs shapes).

``q * scale`` (the query's ``1 / sqrt(head_dim)`` when no scale is given), ``k.transpose(-2, -1)``, ``matmul`` (the
scores), ``softmax`` -- ``masked_softmax`` (``qcast.nn``) with an ``attn_mask`` or ``is_causal`` -- and ``matmul``
(the output). Every intermediate value is then an ordinary node with its own observer and its own ``explain()`` row
(``<sdpa call>.scores`` / ``.softmax`` / ``.out``); which of them run int8 is the backend's kernel table's business.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from ..nn import masked_softmax

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _name(n: fx.Node) -> str:
    return n.meta.get("qcast_name", n.name)


def sdpa_reason(node: fx.Node) -> str | None:
    """Why an sdpa call is left whole (runs in float), or None when it is decomposed."""
    vals = dict(zip(_SDPA_ARGS, node.args))
    vals.update(node.kwargs)
    if vals.get("dropout_p", 0.0) not in (0, 0.0):
        return ("scaled_dot_product_attention with dropout_p != 0 (it drops attention weights even in eval mode) "
                "has no int8 decomposition; runs in float")
    if vals.get("enable_gqa", False) not in (False, None):
        return "scaled_dot_product_attention with enable_gqa=True has no int8 decomposition; runs in float"
    for key in ("is_causal", "scale"):
        if isinstance(vals.get(key), fx.Node):
            return f"scaled_dot_product_attention with {key} computed at run time has no int8 decomposition"
    q = vals.get("query")
    meta = q.meta.get("qcast_val") if isinstance(q, fx.Node) else None
    if not hasattr(meta, "shape") or len(meta.shape) < 2:
        return "scaled_dot_product_attention on a query that is not a traced tensor has no int8 decomposition"
    mask = vals.get("attn_mask")
    if isinstance(mask, fx.Node) and vals.get("is_causal"):
        return "scaled_dot_product_attention with both attn_mask and is_causal raises in PyTorch"
    if mask is not None and not isinstance(mask, fx.Node):
        return "scaled_dot_product_attention with a non-tensor attn_mask has no int8 decomposition"
    return None


#: (name suffix, op) of the nodes a decomposed call becomes, in order (masked_softmax with a mask or is_causal)
_PARTS = (("q_scale", "mul"), ("k_t", "transpose"), ("scores", "matmul"), ("softmax", "softmax"),
          ("softmax", "masked_softmax"), ("out", "matmul"))


def decomposed_ops(gm: fx.GraphModule) -> list[tuple[str, str, str]]:
    """``(name, op, module path)`` of every op the sdpa calls of ``gm`` may be decomposed into, so that ``skip`` /
    ``per_layer`` patterns naming them (as ``explain()`` shows them) are recognised before the decomposition."""
    out = []
    for n in gm.graph.nodes:
        if n.meta.get("qcast_op") == "scaled_dot_product_attention":
            out += [(f"{_name(n)}.{suffix}", op, n.meta.get("qcast_path", "")) for suffix, op in _PARTS]
    return out


def decompose_sdpa(gm: fx.GraphModule, config=None) -> int:
    """Rewrite each ``F.scaled_dot_product_attention`` call into the ops it computes, so each value gets observed
    and each op its int8 kernel. Needs shapes (``node.meta['qcast_val']``): the default scale is
    ``1 / sqrt(head_dim)`` of the traced query. A call the config keeps in float (``skip``, ``activation='float'``)
    or one with arguments the decomposition does not cover is left whole, with its reason. Returns how many were
    rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.meta.get("qcast_op") != "scaled_dot_product_attention":
            continue
        name, path = _name(node), node.meta.get("qcast_path", "")
        if config is not None and (config.skipped_by(name, "scaled_dot_product_attention", path)
                                   or config.setting("activation", name, "scaled_dot_product_attention", path) == "float"):
            continue
        why = sdpa_reason(node)
        if why:
            node.meta["qcast_float_reason"] = why
            continue
        vals = dict(zip(_SDPA_ARGS, node.args))
        vals.update(node.kwargs)
        q, k, v, mask = vals["query"], vals["key"], vals["value"], vals.get("attn_mask")
        scale = vals.get("scale")
        if scale is None:  # the head dim of the query, fixed by the model's weights
            scale = 1.0 / math.sqrt(q.meta["qcast_val"].shape[-1])
        g = gm.graph

        def add(kind, target, args, suffix, op):
            with g.inserting_before(node):
                n = g.call_function(target, args) if kind == "f" else g.call_method(target, args)
            n.meta.update(qcast_op=op, qcast_path=path, qcast_name=f"{name}.{suffix}")
            if "nn_module_stack" in node.meta:
                n.meta["nn_module_stack"] = node.meta["nn_module_stack"]
            return n

        qs = add("f", operator.mul, (q, float(scale)), "q_scale", "mul")
        kt = add("m", "transpose", (k, -2, -1), "k_t", "transpose")
        scores = add("f", operator.matmul, (qs, kt), "scores", "matmul")
        if isinstance(mask, fx.Node) or vals.get("is_causal"):
            probs = add("f", masked_softmax, (scores, mask if isinstance(mask, fx.Node) else None,
                                              bool(vals.get("is_causal"))), "softmax", "masked_softmax")
        else:
            probs = add("f", torch.softmax, (scores, -1), "softmax", "softmax")
        out = add("f", operator.matmul, (probs, v), "out", "matmul")
        node.replace_all_uses_with(out)
        g.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
