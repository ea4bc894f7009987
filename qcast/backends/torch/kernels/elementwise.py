"""add / mul (tensor-tensor, tensor-parameter/buffer, tensor-number), cat, hardswish, sigmoid, tanh, leaky_relu, silu,
hardsigmoid; elu declined (measured)."""
from __future__ import annotations

import math
import numbers

import torch
import torch.fx as fx

from ....capture import attr_at
from ....nn import add_relu
from ....observers import QParams, qparams_from_range
from .base import KernelImpl, KernelModule, PackedKernelModule, kernel_module
from .registry import decline, register

_BINARY_FNS = {"add": torch.ops.quantized.add, "add_relu": torch.ops.quantized.add_relu, "mul": torch.ops.quantized.mul}


def _role(a) -> str:
    """How an add/mul operand reaches the op: ``activation`` (a tensor the graph computes: observed, quantized on
    its edge), ``constant`` (a parameter/buffer: quantized once at convert time), ``number_arg`` (a Python number
    known only at run time: a forward() argument, or computed from shapes) or ``number`` (a literal in the code)."""
    if not isinstance(a, fx.Node):
        return "number"
    if a.op == "get_attr":
        return "constant"
    if a.meta.get("qcast_number"):
        return "number_arg"
    return "activation"


def _activations(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args[:2] if _role(a) == "activation"]


def _other(node: fx.Node):
    """The operand beside the (first) activation, and its role."""
    a, b = node.args[:2]
    return (b, _role(b)) if _role(a) == "activation" else (a, _role(a))


def _name(n: fx.Node) -> str:
    return n.meta.get("qcast_name", n.name)


@kernel_module
class QBinary(KernelModule):
    """quantized::add / add_relu / mul of two quantized tensors, requantized to calibrated output params."""

    def __init__(self, fn: str, out_scale: float, out_zero_point: int):
        super().__init__()
        self.fn, self.out_scale, self.out_zero_point = fn, float(out_scale), int(out_zero_point)
        self._f = _BINARY_FNS[fn]

    def forward(self, a, b):
        return self._f(a, b, self.out_scale, self.out_zero_point)

    def spec(self):
        return dict(fn=self.fn, out_scale=self.out_scale, out_zero_point=self.out_zero_point), {}

    def extra_repr(self):
        return f"{self.fn}, out_scale={self.out_scale:.4g}, zp={self.out_zero_point}"


@kernel_module
class QBinaryConst(PackedKernelModule):
    """quantized::add / add_relu / mul of a quantized activation and a constant tensor (a parameter or buffer,
    e.g. a (1, C, 1, 1) scale), requantized to calibrated output params.

    The constant is a weight, not an activation: it is quantized once, when the model is converted, with its
    own per-tensor quint8 params from its min/max (``qparams_from_range``), and never observed.

    PyTorch's quantized add/mul broadcast (measured on torch 2.13, engines x86, onednn, fbgemm and qnnpack:
    activations (2, 8, 6, 6), channels-last and transposed too, against constants (1, 8, 1, 1), (8, 1, 1),
    (1, 1, 1, 6), (6,), (1,), (): every output within one step of quantize(dequantized a op dequantized b)).
    They allocate the output like their *first* operand and let the broadcast resize it (a deprecated path
    that warns), so the activation always goes first and ``BinaryKernel.check`` accepts a constant only when
    the result has the activation's shape (add and mul commute).
    """

    def __init__(self, fn: str, out_scale: float, out_zero_point: int, const_uint8: torch.Tensor,
                 const_scale: float, const_zero_point: int):
        super().__init__()
        self.fn, self.out_scale, self.out_zero_point = fn, float(out_scale), int(out_zero_point)
        self.const_scale, self.const_zero_point = float(const_scale), int(const_zero_point)
        self.register_buffer("const_uint8", const_uint8.to(torch.uint8))
        self._f = _BINARY_FNS[fn]
        self._const = torch._make_per_tensor_quantized_tensor(self.const_uint8, self.const_scale, self.const_zero_point)

    @classmethod
    def from_float(cls, fn: str, const: torch.Tensor, out_scale: float, out_zero_point: int):
        const = const.detach().float()
        qp = qparams_from_range(float(const.min()), float(const.max()))
        q = torch.quantize_per_tensor(const, qp.scale, qp.zero_point, torch.quint8)
        return cls(fn, out_scale, out_zero_point, q.int_repr(), qp.scale, qp.zero_point)

    def forward(self, x):
        return self._f(x, self._const, self.out_scale, self.out_zero_point)

    def spec(self):
        return (dict(fn=self.fn, out_scale=self.out_scale, out_zero_point=self.out_zero_point,
                     const_scale=self.const_scale, const_zero_point=self.const_zero_point),
                {"const_uint8": self.const_uint8})

    def extra_repr(self):
        return (f"{self.fn}, const={tuple(self.const_uint8.shape)} (scale={self.const_scale:.4g}, "
                f"zp={self.const_zero_point}), out_scale={self.out_scale:.4g}, zp={self.out_zero_point}")


@kernel_module
class QScalar(KernelModule):
    """quantized::add.Scalar / mul.Scalar: params derived from the input's, no calibration needed."""

    def __init__(self, fn: str, value: float, scalar_first: bool = False):
        super().__init__()
        self.fn, self.value, self.scalar_first = fn, float(value), bool(scalar_first)
        self._f = torch.ops.quantized.add.Scalar if fn == "add" else torch.ops.quantized.mul.Scalar

    def forward(self, x):
        return self._f(x, self.value)

    def spec(self):
        return dict(fn=self.fn, value=self.value, scalar_first=self.scalar_first), {}


@kernel_module
class QScalarArg(KernelModule):
    """add / add_relu / mul of a quantized tensor and a number known only at run time (e.g. a float passed to
    forward()), requantized to calibrated output params.

    The number is quantized on each call (cached while it does not change) into a 0-d quint8 tensor that holds
    it exactly (q = 255 or 0 at one end of its own range), and ``quantized::add/add_relu/mul`` broadcasts it,
    rounding once to the calibrated output params. Not ``quantized::add_scalar``/``mul_scalar``: they take
    the number at run time but have no output params (they derive them from the input's, and add_scalar rounds
    the number to the input's step, a bias on every element); requantizing their result costs two more passes.
    Measured (torch 2.13, one thread, (8, 64, 56, 56)): add_scalar 50 us, add_scalar + requantize 600-970 us,
    this kernel 300-520 us, dequantize/op/quantize in float 650-1300 us; op-level SQNR equal within 0.1 dB
    except add 5.0 (add_scalar's rounded number: 50.4-54.5 dB, this kernel 52.7-54.6 dB). The price of
    calibrated params: a number outside the range calibration saw is clipped like any activation.
    """

    def __init__(self, fn: str, out_scale: float, out_zero_point: int):
        super().__init__()
        self.fn, self.out_scale, self.out_zero_point = fn, float(out_scale), int(out_zero_point)
        self._f = _BINARY_FNS[fn]
        self._cached: tuple[float, torch.Tensor] | None = None

    def forward(self, x, value):
        v = self._number(value)
        if self._cached is None or self._cached[0] != v:
            scale, zp = (1.0, 0) if v == 0 else (abs(v) / 255, 0 if v > 0 else 255)
            self._cached = (v, torch.quantize_per_tensor(torch.tensor(v), scale, zp, torch.quint8))
        return self._f(x, self._cached[1], self.out_scale, self.out_zero_point)

    def _number(self, value) -> float:
        if (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_quantized
                and not value.is_complex() and value.dtype != torch.bool):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"this int8 {self.fn} takes a number as its second operand (it was one when the model "
                            f"was quantized), got {type(value).__name__}")
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"this int8 {self.fn} got {v} as its number operand; int8 cannot represent it")
        return v

    def spec(self):
        return dict(fn=self.fn, out_scale=self.out_scale, out_zero_point=self.out_zero_point), {}

    def extra_repr(self):
        return f"{self.fn} with a run-time number, out_scale={self.out_scale:.4g}, zp={self.out_zero_point}"


def _constant_reason(act: fx.Node, const: fx.Node, ctx) -> str | None:
    """Why ``activation (add|mul) parameter/buffer`` cannot run int8 (None when it can)."""
    value, meta, what = attr_at(ctx.gm, const.target), ctx.meta(act), f"constant operand '{const.target}'"
    if not isinstance(value, torch.Tensor):
        return f"{what} is a {type(value).__name__}, not a tensor"
    if not value.is_floating_point() or value.dtype != meta.dtype:
        return (f"{what} is a {value.dtype} tensor and the activation {meta.dtype}: the float op promotes types, the "
                "int8 kernel cannot; runs in float")
    if not bool(torch.isfinite(value).all()):
        return f"{what} holds inf or NaN, which int8 cannot represent; runs in float"
    out = torch.broadcast_shapes(tuple(value.shape), tuple(meta.shape))
    if tuple(out) != tuple(meta.shape):
        return (f"{what} of shape {list(value.shape)} broadcasts the activation of shape {list(meta.shape)} up to "
                f"{list(out)}; the int8 kernel (PyTorch's quantized add/mul) is used only when the output keeps the "
                "activation's shape, so it runs in float")
    return None


@register("add", "mul", kind="compute", engines=("native",),
          notes="tensor+tensor, tensor+parameter/buffer (broadcast, constant quantized at convert) and tensor+number "
                "argument requantized (add fused with a following relu); tensor+literal number keeps params derived")
class BinaryKernel(KernelImpl):
    needs_int8_input = True

    @staticmethod
    def check(node, ctx):
        op = ctx.op(node)
        if node.kwargs:
            return f"{op} with keyword arguments {sorted(node.kwargs)} has no int8 kernel"
        if len(node.args) != 2:
            return f"{op} with {len(node.args)} arguments has no int8 kernel"
        for x in node.args:
            role = _role(x)
            if role == "activation":
                meta = ctx.meta(x)
                if meta is None or not meta.is_float:
                    what = "neither a tensor nor a number" if meta is None else f"a {meta.dtype} tensor"
                    return (f"operand {_name(x)} is {what}; {op} has int8 kernels for floating-point tensors, "
                            "parameters/buffers and numbers")
            elif role == "number" and (not isinstance(x, numbers.Real) or isinstance(x, bool)):
                return f"operand {x!r} is neither a tensor nor a number"
        acts = _activations(node)
        if not acts:
            return f"no operand of {op} is an activation (only parameters/buffers and numbers): nothing to quantize"
        if len(acts) == 2:
            sa, sb = tuple(ctx.meta(acts[0]).shape), tuple(ctx.meta(acts[1]).shape)
            try:
                out = tuple(torch.broadcast_shapes(sa, sb))
            except RuntimeError:
                return f"operands of shapes {list(sa)} and {list(sb)} do not broadcast"
            if out not in (sa, sb):
                return (f"operands {list(sa)} and {list(sb)} both broadcast to {list(out)}: the int8 kernel allocates "
                        "its output like one operand, so one of them must have the output's shape")
            return None
        other, role = _other(node)
        if role == "constant":
            return _constant_reason(acts[0], other, ctx)
        if role == "number" and node.target is add_relu:  # fuse pairs only tensors; QScalar has no relu
            return "add_relu with a literal number has no int8 kernel"
        return None

    @staticmethod
    def quant_inputs(node):
        return _activations(node)

    @staticmethod
    def kind_of(node, default):
        return "passthrough" if _other(node)[1] == "number" else default

    @staticmethod
    def note(node, ctx):
        other, role = _other(node)
        if role == "constant":
            return f"constant '{other.target}' quantized once at convert time (per-tensor, from its min/max)"
        if role == "number_arg":
            return f"number '{_name(other)}' taken at run time"
        return ""

    @staticmethod
    def build(node, ctx):
        act = _activations(node)[0]
        other, role = _other(node)
        if role == "number":
            return QScalar(ctx.op(node), other, scalar_first=node.args[0] is not act), (act,)
        qp = ctx.out_qparams(node)
        fn = "add_relu" if node.target is add_relu else ctx.op(node)
        if role == "constant":  # the activation goes first: the kernel allocates its output like that operand
            return QBinaryConst.from_float(fn, attr_at(ctx.gm, other.target), qp.scale, qp.zero_point), (act,)
        if role == "number_arg":
            return QScalarArg(fn, qp.scale, qp.zero_point), (act, other)
        a, b = node.args
        if tuple(ctx.meta(a).shape) != tuple(ctx.meta(node).shape):  # e.g. x * se(x): the full-shape operand first
            a, b = b, a
        return QBinary(fn, qp.scale, qp.zero_point), (a, b)


@kernel_module
class QCat(KernelModule):
    """quantized::cat: inputs may carry different params; the output is requantized to calibrated params."""

    def __init__(self, dim: int, out_scale: float, out_zero_point: int):
        super().__init__()
        self.dim, self.out_scale, self.out_zero_point = int(dim), float(out_scale), int(out_zero_point)

    def forward(self, tensors):
        return torch.ops.quantized.cat(list(tensors), self.dim, self.out_scale, self.out_zero_point)

    def spec(self):
        return dict(dim=self.dim, out_scale=self.out_scale, out_zero_point=self.out_zero_point), {}


def _cat_dim(node):
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("dim", node.kwargs.get("axis", 0))


@register("cat", kind="compute", engines=("native",), notes="inputs with different params requantized to one")
class CatKernel(KernelImpl):
    needs_int8_input = True

    @staticmethod
    def check(node, ctx):
        seq = node.args[0] if node.args else node.kwargs.get("tensors")
        if not isinstance(seq, (list, tuple)) or not seq:
            return "cat of a computed sequence (not a literal list of tensors) runs in float"
        for t in seq:
            if not isinstance(t, fx.Node) or ctx.meta(t) is None or not ctx.meta(t).is_float:
                return "an input is not a floating-point tensor"
            if t.op == "get_attr":
                return f"input '{t.target}' is a constant tensor (a parameter/buffer), not an activation"
        if not isinstance(_cat_dim(node), int):
            return "cat along a computed dim runs in float"
        return None

    @staticmethod
    def quant_inputs(node):
        return list(node.args[0] if node.args else node.kwargs["tensors"])

    @staticmethod
    def build(node, ctx):
        qp = ctx.out_qparams(node)
        seq = node.args[0] if node.args else node.kwargs["tensors"]
        dim = _cat_dim(node)
        rank = len(ctx.meta(node).shape)
        return QCat(dim % rank, qp.scale, qp.zero_point), (list(seq),)


@kernel_module
class QHardswish(KernelModule):
    """quantized::hardswish with calibrated output params."""

    def __init__(self, out_scale: float, out_zero_point: int):
        super().__init__()
        self.out_scale, self.out_zero_point = float(out_scale), int(out_zero_point)

    def forward(self, x):
        return torch.ops.quantized.hardswish(x, self.out_scale, self.out_zero_point)

    def spec(self):
        return dict(out_scale=self.out_scale, out_zero_point=self.out_zero_point), {}


@register("hardswish", kind="compute", engines=("native",), notes="requantized to calibrated output params")
class HardswishKernel(KernelImpl):
    needs_int8_input = True

    @staticmethod
    def build(node, ctx):
        qp = ctx.out_qparams(node)
        return QHardswish(qp.scale, qp.zero_point), (node.args[0],)


@register("sigmoid", kind="fixed", engines=("native",), notes="fixed output params: [0, 1] in 256 steps")
class SigmoidKernel(KernelImpl):
    needs_int8_input = True
    fixed_qparams = QParams(scale=1.0 / 256.0, zero_point=0)


@register("tanh", kind="fixed", engines=("native",), notes="fixed output params: [-1, 1] in 256 steps")
class TanhKernel(KernelImpl):
    needs_int8_input = True
    fixed_qparams = QParams(scale=2.0 / 256.0, zero_point=128)


# -------------------------------------------------------------------------------------------------
# leaky_relu, silu (requantized to calibrated output params), hardsigmoid (fixed params)
#
# Measured (torch 2.13, an (8, 16, 12, 12) tensor ~ N(0.3, 2) quantized to u8 over its range; SQNR against the float
# op on the float input; "float op": dequantize, the float op, quantize with the output's own range, which is what
# running it in float between int8 ops costs): leaky_relu(0.1) quantized::leaky_relu 39.1 dB = float op 39.1;
# elu quantized::elu 39.0 = 39.0 (but 3.3 dB below elu in float on a small CNN: declined); silu as quantized sigmoid (fixed [0, 1] grid) times x, quantized::mul requantized
# 38.8 = 38.8; hardsigmoid on the int8 tensor (fixed [0, 1] grid) 45.3 vs 45.8. GELU has no kernel with output params
# (ATen's keeps the input's, 36.1 vs 39.1): it stays float (transformer.py). Model-level figures: docs/design.md
# and tests/backends/torch/kernels/test_activations.py.
# -------------------------------------------------------------------------------------------------
def _act_arg(node: fx.Node, ctx, attr: str, index: int, default: float) -> float:
    """An activation's number argument: the module's attribute, or the function's positional/keyword argument."""
    if node.op == "call_module":
        return float(getattr(ctx.module(node), attr))
    value = node.args[index] if len(node.args) > index else node.kwargs.get(attr, default)
    return value


def _number_check(node: fx.Node, ctx, attr: str, index: int, default: float) -> str | None:
    reason = not_float_act(node, ctx)
    if reason:
        return reason
    value = _act_arg(node, ctx, attr, index, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        return f"its {attr} is not a literal finite number (computed at run time?); runs in float"
    return None


def not_float_act(node: fx.Node, ctx) -> str | None:
    meta = ctx.meta(node.args[0]) if node.args else None
    return None if meta is not None and meta.is_float else "its input is not a floating-point tensor"


@kernel_module
class QLeakyReLU(KernelModule):
    """quantized::leaky_relu with calibrated output params."""

    def __init__(self, negative_slope: float, out_scale: float, out_zero_point: int):
        super().__init__()
        self.negative_slope, self.out_scale, self.out_zero_point = float(negative_slope), float(out_scale), int(
            out_zero_point)

    def forward(self, x):
        return torch.ops.quantized.leaky_relu(x, self.negative_slope, False, self.out_scale, self.out_zero_point)

    def spec(self):
        return dict(negative_slope=self.negative_slope, out_scale=self.out_scale, out_zero_point=self.out_zero_point), {}


@register("leaky_relu", kind="compute", engines=("native",),
          notes="quantized::leaky_relu, requantized to calibrated output params")
class LeakyReLUKernel(KernelImpl):
    needs_int8_input = True

    @staticmethod
    def check(node, ctx):
        return _number_check(node, ctx, "negative_slope", 1, 0.01)

    @staticmethod
    def build(node, ctx):
        qp = ctx.out_qparams(node)
        return QLeakyReLU(_act_arg(node, ctx, "negative_slope", 1, 0.01), qp.scale, qp.zero_point), (node.args[0],)


decline("elu", "elu runs in float, by measurement: quantized::elu is exact (within half a step of the float op on the "
               "same int8 input) but, with the requantization of its input it needs, a small CNN (conv-elu-conv-elu) "
               "measured 53.2 dB vs 56.5 dB with elu in float (leaky_relu, silu, hardsigmoid: within 0.9 dB, so "
               "int8); the next int8 op quantizes its output with calibrated params")


@kernel_module
class QSiLU(KernelModule):
    """x * sigmoid(x) on the int8 tensor: PyTorch's int8 sigmoid (fixed [0, 1] grid), then quantized::mul requantized
    to calibrated output params (PyTorch has no int8 SiLU kernel)."""

    def __init__(self, out_scale: float, out_zero_point: int):
        super().__init__()
        self.out_scale, self.out_zero_point = float(out_scale), int(out_zero_point)

    def forward(self, x):
        return torch.ops.quantized.mul(x, torch.sigmoid(x), self.out_scale, self.out_zero_point)

    def spec(self):
        return dict(out_scale=self.out_scale, out_zero_point=self.out_zero_point), {}


@register("silu", kind="compute", engines=("native",),
          notes="x * sigmoid(x): int8 sigmoid (fixed params) and quantized::mul, requantized to calibrated output params")
class SiLUKernel(KernelImpl):
    needs_int8_input = True

    @staticmethod
    def check(node, ctx):
        return not_float_act(node, ctx)

    @staticmethod
    def build(node, ctx):
        qp = ctx.out_qparams(node)
        return QSiLU(qp.scale, qp.zero_point), (node.args[0],)


@register("hardsigmoid", kind="fixed", engines=("native",), notes="fixed output params: [0, 1] in 256 steps")
class HardsigmoidKernel(KernelImpl):
    needs_int8_input = True
    fixed_qparams = QParams(scale=1.0 / 256.0, zero_point=0)

    @staticmethod
    def check(node, ctx):
        return not_float_act(node, ctx)
