"""Rewrite an exported QDQ ONNX graph into the pattern ONNX Runtime's QDQ fusions take (the one ``quantize_static``
emits), without changing what it computes beyond the int32 bias rounding.

``torch.onnx.export`` of the QDQ graph (int8 weights read through ``fake_quantize_per_channel_affine``) gives
QuantizeLinear -> DequantizeLinear on float weight initializers, float biases, activation DQs shared by several
consumers, a Relu between a conv and its output Q, and pass-through ops (MaxPool, Flatten) between a DQ and the
next conv. ORT fuses a conv/gemm to QLinearConv/QGemm only on: int8 weight initializer -> DQ, int32 bias (scale
``x_scale * w_scale``, zero point 0) -> DQ, a DQ on every input, a Q on the output, one consumer per DQ. So
(``canonicalize``):

1. Constant nodes and Identity-of-constant nodes become initializers.
2. Q -> DQ on a float initializer: the Q is applied once, here; the DQ reads the int8 initializer
   ``<module path>.weight_int8`` (the weight is on its grid already, so nothing moves).
3. A pass-through op (MaxPool, Flatten, Reshape...) fed by a DQ gets Q -> DQ with that DQ's params on its output:
   its output values are on that grid already, so this is exact, and the next conv sees a DQ input.
4. A float bias of a conv/gemm whose input and weight come from DQs: ``round(b / (x_scale * w_scale))`` as int32
   through a DQ (the only rounding this rewrite adds: at most half a step of the accumulator, far below the
   output's quantization step).
5. Relu (or Clip) between a conv/gemm and its output Q is dropped where the Q clamps the same way: Relu when the
   Q's zero point is its lowest value, Clip when the Q's range lies inside the clip range.
6. Every DQ gets exactly one consumer (shared DQs are duplicated).

Initializer names keep qcast's module paths (weights: ``<path>.weight_int8``) so explain() can map the
nodes of ORT's optimized model back to qcast's op rows.
"""
from __future__ import annotations

import numpy as np

#: ops whose output values are a subset of their input values (int8 in ORT when wrapped in DQ -> op -> Q)
PASS_THROUGH = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")
WEIGHTED = ("Conv", "Gemm", "MatMul", "ConvTranspose")
#: torch.onnx names a parametrized weight ``<module path>.parametrizations.weight.original``
PARAMETRIZED = ".parametrizations.weight.original"


class _Graph:
    """The graph as plain Python lists/dicts (onnx's protobuf lists are awkward to edit in place)."""

    def __init__(self, model):
        from onnx import numpy_helper

        g = model.graph
        self.model = model
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.nodes = list(g.node)
        self.outputs = {o.name for o in g.output}

    def producer(self, name):
        return next((n for n in self.nodes if name in n.output), None)

    def consumers(self, name):
        return [n for n in self.nodes if name in n.input]

    def uses(self, name) -> int:
        return sum(list(n.input).count(name) for n in self.nodes) + (name in self.outputs)

    def add_const(self, name: str, value: np.ndarray) -> str:
        self.consts[name] = value
        return name

    def write(self) -> None:
        from onnx import numpy_helper

        g = self.model.graph
        used = {i for n in self.nodes for i in n.input} | self.outputs
        del g.node[:]
        g.node.extend(self.nodes)
        del g.initializer[:]
        g.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in self.consts.items() if k in used)
        # value_info of removed tensors would confuse shape inference
        keep = {o for n in self.nodes for o in n.output}
        infos = [v for v in g.value_info if v.name in keep]
        del g.value_info[:]
        g.value_info.extend(infos)


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value):
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _fold_constants(g: _Graph) -> None:
    from onnx import numpy_helper

    kept = []
    for n in g.nodes:
        if n.op_type == "Constant" and _attr(n, "value") is not None:
            g.consts[n.output[0]] = numpy_helper.to_array(_attr(n, "value"))
        elif n.op_type == "Identity" and n.input[0] in g.consts:
            g.consts[n.output[0]] = g.consts[n.input[0]]
        else:
            kept.append(n)
    g.nodes = kept


def _broadcast(scale: np.ndarray, axis: int, rank: int) -> np.ndarray:
    if scale.ndim == 0:
        return scale
    shape = [1] * rank
    shape[axis] = -1
    return scale.reshape(shape)


def _module_path(weight: str) -> str:
    return weight[: -len(PARAMETRIZED)] if weight.endswith(PARAMETRIZED) else weight


def _quantize_weights(g: _Graph) -> None:
    """Q -> DQ on a float initializer: an int8 (or uint8) initializer -> DQ."""
    for q in [n for n in g.nodes if n.op_type == "QuantizeLinear" and n.input[0] in g.consts]:
        w = g.consts[q.input[0]]
        if not np.issubdtype(w.dtype, np.floating):
            continue
        scale, zp = g.consts[q.input[1]], g.consts[q.input[2]]
        axis = _attr(q, "axis", 1) % max(w.ndim, 1)
        info = np.iinfo(zp.dtype)
        ints = np.rint(w / _broadcast(scale, axis, w.ndim)) + _broadcast(zp, axis, w.ndim).astype(np.int64)
        path = _module_path(q.input[0])
        base = f"{path}.weight" if q.input[0].endswith(PARAMETRIZED) else path
        data = g.add_const(f"{base}_int8", np.clip(ints, info.min, info.max).astype(zp.dtype))
        s = g.add_const(f"{base}_scale", scale.astype(np.float32))
        z = g.add_const(f"{base}_zero_point", zp)
        for dq in [c for c in g.consumers(q.output[0]) if c.op_type == "DequantizeLinear"]:
            dq.input[:] = [data, s, z]
            if scale.ndim:
                _set_attr(dq, "axis", axis)
        if not g.uses(q.output[0]):
            g.nodes.remove(q)


def _dq_params(g: _Graph, name: str):
    """(scale, zero point, axis) of the DQ producing ``name`` with constant params, else None."""
    dq = g.producer(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in g.consts:
        return None
    return g.consts[dq.input[1]], g.consts[dq.input[2]] if len(dq.input) > 2 else None, _attr(dq, "axis", 1), dq


def _quantize_biases(g: _Graph) -> None:
    """A float bias initializer of a conv/gemm with DQ input and DQ int8 weight: int32 -> DQ."""
    for n in [n for n in g.nodes if n.op_type in ("Conv", "Gemm", "ConvTranspose") and len(n.input) > 2]:
        bias = n.input[2]
        x, w = _dq_params(g, n.input[0]), _dq_params(g, n.input[1])
        if bias not in g.consts or x is None or w is None or g.consts[w[3].input[0]].dtype != np.int8:
            continue
        if n.op_type == "Gemm" and (_attr(n, "alpha", 1.0) != 1.0 or _attr(n, "beta", 1.0) != 1.0):
            continue
        b = g.consts[bias].astype(np.float64)
        scale = (np.float64(x[0]) * w[0].astype(np.float64)).astype(np.float32)
        scale = np.where(scale == 0, np.float32(1e-30), scale)
        ints = np.clip(np.rint(b / scale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
        base = bias[: -len(".bias")] if bias.endswith(".bias") else bias
        data = g.add_const(f"{base}.bias_int32", ints)
        s = g.add_const(f"{base}.bias_scale", scale)
        z = g.add_const(f"{base}.bias_zero_point", np.zeros(scale.shape, np.int32))
        dq = _node("DequantizeLinear", [data, s, z], f"{base}.bias_dequantized", f"{base}/bias/DequantizeLinear",
                   axis=0 if scale.ndim else None)
        g.nodes.insert(g.nodes.index(n), dq)
        n.input[2] = dq.output[0]


def _node(op, inputs, output, name, **attrs):
    from onnx import helper

    return helper.make_node(op, inputs, [output], name=name, **{k: v for k, v in attrs.items() if v is not None})


def _fold_activations(g: _Graph) -> None:
    """conv/gemm -> Relu/Clip -> Q: drop the Relu/Clip where the Q clamps identically."""
    for act in [n for n in g.nodes if n.op_type in ("Relu", "Clip")]:
        src, users = g.producer(act.input[0]), g.consumers(act.output[0])
        if src is None or src.op_type not in WEIGHTED or g.uses(act.input[0]) != 1 or act.output[0] in g.outputs:
            continue
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or users[0].input[1] not in g.consts:
            continue
        q = users[0]
        scale, zp = float(g.consts[q.input[1]]), g.consts[q.input[2]]
        info = np.iinfo(zp.dtype)
        lo, hi = scale * (info.min - int(zp)), scale * (info.max - int(zp))
        if act.op_type == "Relu":
            removable = int(zp) == info.min
        else:
            cmin = float(g.consts[act.input[1]]) if len(act.input) > 1 and act.input[1] in g.consts else -np.inf
            cmax = float(g.consts[act.input[2]]) if len(act.input) > 2 and act.input[2] in g.consts else np.inf
            removable = cmin <= lo + 1e-6 * scale and hi <= cmax + scale / 2  # inside the clip: Q clamps the same
        if removable:
            q.input[0] = act.input[0]
            g.nodes.remove(act)


def _requantize_pass_through(g: _Graph) -> None:
    """DQ -> MaxPool/Flatten/... -> (not Q): Q -> DQ with the DQ's params after the op (exact)."""
    for n in [n for n in g.nodes if n.op_type in PASS_THROUGH]:
        p = _dq_params(g, n.input[0])
        if p is None or p[0].ndim or all(c.op_type == "QuantizeLinear" for c in g.consumers(n.output[0])):
            continue
        dq = p[3]
        out = n.output[0]
        inner = f"{out}_requantized"
        n.output[0] = inner
        q = _node("QuantizeLinear", [inner, *dq.input[1:]], f"{inner}_q", f"{n.name}/QuantizeLinear")
        d = _node("DequantizeLinear", [q.output[0], *dq.input[1:]], out, f"{n.name}/DequantizeLinear")
        i = g.nodes.index(n)
        g.nodes[i + 1:i + 1] = [q, d]


def _one_consumer_per_dq(g: _Graph) -> None:
    for dq in [n for n in g.nodes if n.op_type == "DequantizeLinear"]:
        out = dq.output[0]
        sites = [(c, i) for c in g.consumers(out) for i, name in enumerate(c.input) if name == out]
        keep = 0 if out in g.outputs else 1
        for k, (c, i) in enumerate(sites[keep:], start=1):
            copy = _node("DequantizeLinear", list(dq.input), f"{out}_{k}", f"{dq.name}_{k}", axis=_attr(dq, "axis"))
            g.nodes.insert(g.nodes.index(dq) + 1, copy)
            c.input[i] = copy.output[0]


def canonicalize(model):
    """The rewritten ``onnx.ModelProto`` (in place), see the module docstring."""
    g = _Graph(model)
    _fold_constants(g)
    _quantize_weights(g)
    _requantize_pass_through(g)
    _quantize_biases(g)
    _fold_activations(g)
    _one_consumer_per_dq(g)
    g.write()
    return model
