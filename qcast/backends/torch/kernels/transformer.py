"""Transformer ops: layer_norm, unbind, division by a number, embedding, the residual-stream rule; gelu stays float.

**The residual stream stays float** (``keep_residual_stream_float``, run by ``plan_graph`` before planning). A
layer_norm rescales each row (token) by that row's own spread, so the error that matters on its input is the
quantization step relative to *each row's* spread, while a per-tensor int8 step is sized by the whole tensor's
range. When some rows are much smaller than others, int8 erases them. Measured on the zoo's DeiT-tiny (random
weights): the class-token row of the residual stream has a standard deviation of 0.02, the patch rows ~1.0, the
per-tensor int8 step of the stream is ~0.026: the class token, the only row the head reads, was rounded to a
few steps and the output SQNR was 6.2 dB; with the adds and the cat feeding layer norms in float it is 31.5 dB
(everything else unchanged, attention in float). On trained transformers the same stream carries a few huge
outlier channels (Bondarenko et al., 2021, "Understanding and overcoming the challenges of efficient transformer
quantization"), with the same remedy. So the elementwise ops (add, sub, mul, div, cat) whose result reaches a
layer_norm, through shape ops only, run in float; the layer_norm runs in float on that float input, and the int8
op after it (qkv, fc1) quantizes its normalized output, whose rows all have a spread of about one.

``layer_norm`` is int8 (``quantized::layer_norm``, requantized to calibrated output params) where its input already
is int8, e.g. straight after a conv or linear (ConvNeXt-style blocks, qk-norm).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.fx as fx
import torch.nn as nn

from ....capture import attr_at
from .base import KernelImpl, KernelModule, PackedKernelModule, input_meta, kernel_module, not_float_input
from .elementwise import QScalar
from .registry import decline, register

#: ops the residual-stream walk goes through without marking them (their int8-ness follows their input)
_THROUGH = {"view", "reshape", "permute", "transpose", "flatten", "contiguous", "squeeze", "unsqueeze", "getitem",
            "expand", "dropout", "identity", "to", "float", "type_as"}
#: elementwise ops that, when their result reaches a layer_norm, are part of the residual stream: kept float
_STREAM = {"add", "sub", "mul", "div", "cat"}
#: the op names whose input defines a residual stream
NORM_OPS = ("layer_norm",)
#: the key of ``node.meta`` that says a node is on a residual stream (value: the layer_norm's name)
STREAM_KEY = "qcast_residual_stream"


def _name(n: fx.Node) -> str:
    return n.meta.get("qcast_name", n.name)


def keep_residual_stream_float(gm: fx.GraphModule) -> None:
    """Mark every add/sub/mul/div/cat whose result reaches a layer_norm (through shape ops only) to run in float.

    Sets ``node.meta['qcast_float_reason']`` (which ``plan_graph`` honours) and ``node.meta[STREAM_KEY]``. See the
    module docstring for why and for the measurement."""
    for norm in gm.graph.nodes:
        if norm.meta.get("qcast_op") not in NORM_OPS or not norm.args or not isinstance(norm.args[0], fx.Node):
            continue
        todo, seen = [norm.args[0]], set()
        while todo:
            n = todo.pop()
            if not isinstance(n, fx.Node) or n in seen or n.op not in ("call_function", "call_method", "call_module"):
                continue
            seen.add(n)
            op = n.meta.get("qcast_op", "")
            if op in _THROUGH:
                todo.extend(n.all_input_nodes[:1])
            elif op in _STREAM:
                if "qcast_float_reason" not in n.meta:
                    n.meta["qcast_float_reason"] = (
                        f"residual stream into {_name(norm)} (layer_norm), kept in float: layer_norm rescales each row "
                        "by its own spread, and a per-tensor int8 step sized for the whole stream erases rows with a "
                        "small spread (DeiT's class token: 6 dB output SQNR with this int8, 31 dB without)")
                    n.meta[STREAM_KEY] = _name(norm)
                todo.extend(n.all_input_nodes)


def _stream_source(node: fx.Node) -> fx.Node | None:
    """The residual-stream op a value comes from (through shape ops), or None."""
    n = node
    while isinstance(n, fx.Node):
        if STREAM_KEY in n.meta:
            return n
        if n.meta.get("qcast_op") not in _THROUGH or not n.all_input_nodes:
            return None
        n = n.all_input_nodes[0]
    return None


# -------------------------------------------------------------------------------------------------
# unbind, division by a number
# -------------------------------------------------------------------------------------------------
@register("unbind", kind="passthrough", engines=("native",), notes="split along a dim on the int8 tensor (q, k, v)")
class UnbindKernel(KernelImpl):
    needs_int8_input = True


def _div_operand(node: fx.Node):
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("other")


@register("div", kind="passthrough", engines=("native",),
          notes="division by a literal number: quantized::mul.Scalar by its inverse, params derived (exact)")
class DivKernel(KernelImpl):
    """``x / c`` with ``c`` a number written in the code (``scores / math.sqrt(d)``): multiplying by ``1 / c``
    only rescales the quantization params (``quantized::mul.Scalar`` derives the output scale), so the int8
    values pass through unchanged and nothing is calibrated."""

    needs_int8_input = True

    @staticmethod
    def check(node, ctx):
        if set(node.kwargs) - {"other"} or len(node.args) > 2:
            return "div with a rounding_mode or out argument has no int8 kernel"
        a, b = node.args[0] if node.args else None, _div_operand(node)
        if not isinstance(a, fx.Node) or a.op == "get_attr":
            return "div whose dividend is not an activation has no int8 kernel"
        if isinstance(b, fx.Node):
            return (f"div by {'a constant tensor' if b.op == 'get_attr' else 'a tensor or a run-time number'} "
                    f"({_name(b)}) has no int8 kernel (division by a number written in the code has)")
        if not isinstance(b, numbers.Real) or isinstance(b, bool) or not math.isfinite(b) or b == 0:
            return f"div by {b!r} has no int8 kernel (a finite, non-zero number is needed)"
        return None

    @staticmethod
    def note(node, ctx):
        return f"multiplies by 1/{_div_operand(node):g}: params rescaled, int8 values unchanged"

    @staticmethod
    def build(node, ctx):
        return QScalar("mul", 1.0 / float(_div_operand(node))), (node.args[0],)


# -------------------------------------------------------------------------------------------------
# layer_norm
# -------------------------------------------------------------------------------------------------
@kernel_module
class QLayerNorm(KernelModule):
    """quantized::layer_norm over the last dims, requantized to calibrated output params (measured bit-exact
    against dequantize -> F.layer_norm -> quantize on torch 2.13)."""

    def __init__(self, normalized_shape, eps: float, out_scale: float, out_zero_point: int, weight=None, bias=None):
        super().__init__()
        self.normalized_shape = [int(s) for s in normalized_shape]
        self.eps, self.out_scale, self.out_zero_point = float(eps), float(out_scale), int(out_zero_point)
        self.register_buffer("weight", None if weight is None else weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x):
        return torch.ops.quantized.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                                              self.out_scale, self.out_zero_point)

    def spec(self):
        tensors = {k: getattr(self, k) for k in ("weight", "bias") if getattr(self, k) is not None}
        return dict(normalized_shape=self.normalized_shape, eps=self.eps, out_scale=self.out_scale,
                    out_zero_point=self.out_zero_point), tensors

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps:g}, out_scale={self.out_scale:.4g}, zp={self.out_zero_point}"


def _ln_args(node: fx.Node, ctx):
    """(normalized_shape, weight, bias, eps) of a layer_norm node, or a str saying why it has no int8 kernel."""
    if node.op == "call_module":
        m = ctx.module(node)
        if not isinstance(m, nn.LayerNorm):
            return f"{type(m).__name__} is not an nn.LayerNorm"
        return list(m.normalized_shape), m.weight, m.bias, m.eps
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    vals = dict(zip(names, node.args))
    vals.update(node.kwargs)
    shape = vals.get("normalized_shape")
    if isinstance(shape, int):
        shape = [shape]
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) for s in shape):
        return ("layer_norm with a normalized_shape computed at run time has no int8 kernel (a shape written in the "
                "code, or nn.LayerNorm, has)")
    out = [list(shape)]
    for key in ("weight", "bias"):
        v = vals.get(key)
        if isinstance(v, fx.Node):
            if v.op != "get_attr":
                return f"layer_norm with a {key} computed at run time has no int8 kernel"
            v = attr_at(ctx.gm, v.target)
        out.append(v)
    eps = vals.get("eps", 1e-5)
    if not isinstance(eps, numbers.Real):
        return "layer_norm with an eps computed at run time has no int8 kernel"
    return (*out, float(eps))


@register("layer_norm", kind="compute", engines=("native",),
          notes="quantized::layer_norm where its input is already int8; a residual stream stays float (see module)")
class LayerNormKernel(KernelImpl):
    needs_int8_input = True

    @staticmethod
    def check(node, ctx):
        src = _stream_source(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if src is not None:
            return (f"reads the residual stream ({_name(src)}), which stays float (see that row); runs in float and "
                    "the next int8 op quantizes its normalized output")
        reason = not_float_input(node, ctx)
        if reason:
            return reason
        args = _ln_args(node, ctx)
        if isinstance(args, str):
            return args
        shape, weight, bias, _ = args
        meta = input_meta(node, ctx)
        if tuple(meta.shape[len(meta.shape) - len(shape):]) != tuple(shape):
            return f"normalized_shape {shape} does not match the input's last dims {list(meta.shape)}"
        for what, t in (("weight", weight), ("bias", bias)):
            if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
                return f"its {what} is not a floating-point tensor"
        return None

    @staticmethod
    def build(node, ctx):
        qp = ctx.out_qparams(node)
        shape, weight, bias, eps = _ln_args(node, ctx)
        return QLayerNorm(shape, eps, qp.scale, qp.zero_point, weight, bias), (node.args[0],)


# -------------------------------------------------------------------------------------------------
# gelu: float, by measurement
# -------------------------------------------------------------------------------------------------
#: PyTorch's int8 GELU (``F.gelu`` on a quantized tensor) is bit-exact against dequantize -> gelu -> quantize with
#: the *input's* params; GELU maps ``[-a, b]`` to about ``[-0.17, b]``, so those params leave nearly half of the 256
#: steps unused. Measured on the zoo's DeiT-tiny (everything else as shipped): output SQNR 29.3 dB with it, 31.6 dB
#: with GELU in float and its output quantized by the next int8 layer with calibrated params. A "GELU kernel" with
#: calibrated output params would be that same float arithmetic under another name, so GELU stays float.
decline("gelu", "gelu runs in float, by measurement: PyTorch's int8 GELU keeps its input's params, which waste the "
                "negative half of the range (DeiT-tiny: 29.3 dB vs 31.6 dB in float); the next int8 op quantizes its "
                "output with calibrated params")


# -------------------------------------------------------------------------------------------------
# embedding: int8 weights, float output
# -------------------------------------------------------------------------------------------------
def embedding_qparams(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, float zero point) covering each row's min..max in 256 steps, as PyTorch's
    ``per_channel_affine_float_qparams`` embeddings use them (a constant row gets scale 1)."""
    lo, hi = w.min(dim=1).values.float(), w.max(dim=1).values.float()
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > torch.finfo(torch.float32).eps, scale, torch.ones_like(scale))
    return scale, -lo / scale


@kernel_module
class QEmbedding(PackedKernelModule):
    """``quantized::embedding_byte``: rows stored as uint8 with a float scale and zero point each (8-bit row-wise,
    4x smaller than fp32), looked up and dequantized to a float output.

    The output is float (``weight_only`` kind): what reads an embedding is usually a sum of embeddings feeding a
    layer_norm, a residual stream that stays float. Measured on a 30522 x 384 table (MiniLM's), 128 tokens, one
    thread: SQNR of the looked-up rows 43 dB; 160 us per lookup vs 7 us for fp32 ``F.embedding`` (per-call
    overhead; noise next to the encoder's layers)."""

    def __init__(self, weight_uint8: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_uint8", weight_uint8.to(torch.uint8))
        self.register_buffer("scales", scales.float())
        self.register_buffer("zero_points", zero_points.float())
        wf = (self.weight_uint8.float() - self.zero_points[:, None]) * self.scales[:, None]
        qw = torch.quantize_per_channel(wf, self.scales, self.zero_points, 0, torch.quint8)
        self._packed = torch.ops.quantized.embedding_bag_prepack(qw)

    @classmethod
    def from_float(cls, weight: torch.Tensor):
        w = weight.detach().float()
        scales, zps = embedding_qparams(w)
        qw = torch.quantize_per_channel(w, scales, zps, 0, torch.quint8)
        return cls(qw.int_repr(), scales, zps)

    def forward(self, indices):
        return torch.ops.quantized.embedding_byte(self._packed, indices.contiguous())

    def spec(self):
        return {}, {"weight_uint8": self.weight_uint8, "scales": self.scales, "zero_points": self.zero_points}

    def extra_repr(self):
        return f"{tuple(self.weight_uint8.shape)}, 8-bit rows"


def _embedding_weight(node: fx.Node, ctx):
    """The weight tensor of an embedding call, or a str saying why it has no int8 kernel."""
    if node.op == "call_module":
        m = ctx.module(node)
        if not isinstance(m, nn.Embedding):
            return f"{type(m).__name__} is not an nn.Embedding"
        if m.max_norm is not None:
            return "nn.Embedding with max_norm renormalizes its weight at run time; no int8 kernel"
        return m.weight
    names = ("input", "weight", "padding_idx", "max_norm")
    vals = dict(zip(names, node.args))
    vals.update(node.kwargs)
    if vals.get("max_norm") is not None:
        return "F.embedding with max_norm renormalizes its weight at run time; no int8 kernel"
    w = vals.get("weight")
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return "F.embedding of a weight computed at run time has no int8 kernel (a parameter/buffer has)"
    return attr_at(ctx.gm, w.target)


@register("embedding", kind="weight_only", engines=("native",),
          notes="quantized::embedding_byte: 8-bit rows (scale and zero point per row), float output")
class EmbeddingKernel(KernelImpl):
    @staticmethod
    def check(node, ctx):
        w = _embedding_weight(node, ctx)
        if isinstance(w, str):
            return w
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            return "its weight is not a 2-D floating-point tensor"
        idx = ctx.meta(node.args[0]) if node.args else None
        if idx is None or idx.dtype not in (torch.int64, torch.int32):
            return "its indices are not an int64/int32 tensor"
        return None

    @staticmethod
    def quant_inputs(node):
        return []  # the indices are integers: nothing to observe

    @staticmethod
    def note(node, ctx):
        return "8-bit rows, float output"

    @staticmethod
    def build(node, ctx):
        rows = getattr(ctx.module(node), "qcast_rows", None) if node.op == "call_module" else None
        if rows is not None:  # an embedding read from a file: its 8-bit rows as saved (serialize._compact_weight)
            return QEmbedding(*rows), (node.args[0],)
        return QEmbedding.from_float(_embedding_weight(node, ctx)), (node.args[0],)
