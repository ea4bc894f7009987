"""add / mul (tensor-tensor and tensor-scalar), cat, hardswish, sigmoid, tanh."""
from __future__ import annotations

import numbers

import torch
import torch.fx as fx

from ..nn import add_relu
from ..observers import QParams
from .base import KernelImpl, KernelModule, kernel_module
from .registry import register


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args[:2] if isinstance(a, fx.Node)]


@kernel_module
class QBinary(KernelModule):
    """quantized::add / add_relu / mul of two quantized tensors, requantized to calibrated output params."""

    _FNS = {"add": torch.ops.quantized.add, "add_relu": torch.ops.quantized.add_relu, "mul": torch.ops.quantized.mul}

    def __init__(self, fn: str, out_scale: float, out_zero_point: int):
        super().__init__()
        self.fn, self.out_scale, self.out_zero_point = fn, float(out_scale), int(out_zero_point)
        self._f = self._FNS[fn]

    def forward(self, a, b):
        return self._f(a, b, self.out_scale, self.out_zero_point)

    def spec(self):
        return dict(fn=self.fn, out_scale=self.out_scale, out_zero_point=self.out_zero_point), {}

    def extra_repr(self):
        return f"{self.fn}, out_scale={self.out_scale:.4g}, zp={self.out_zero_point}"


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


@register("add", "mul", kind="compute", engines=("native",),
          notes="tensor+tensor requantized (add fused with a following relu); tensor+scalar keeps params derived")
class BinaryKernel(KernelImpl):
    needs_int8_input = True

    @staticmethod
    def check(node, ctx):
        if node.kwargs:
            return f"{ctx.op(node)} with keyword arguments {sorted(node.kwargs)} has no int8 kernel"
        if len(node.args) != 2:
            return f"{ctx.op(node)} with {len(node.args)} arguments has no int8 kernel"
        a, b = node.args
        tensors = _tensor_args(node)
        for t in tensors:
            if t.op == "get_attr":
                return f"operand '{t.target}' is a constant tensor (a parameter/buffer), not an activation"
            meta = ctx.meta(t)
            if meta is None or not meta.is_float:
                return (f"operand {t.meta.get('qcast_name', t.name)} is not a floating-point tensor (e.g. a number "
                        f"passed to forward()); {ctx.op(node)} has an int8 kernel for a constant number only")
        if len(tensors) == 2:
            sa, sb = ctx.meta(a).shape, ctx.meta(b).shape
            if sa != sb:
                return f"operands have different shapes {list(sa)} and {list(sb)} (broadcasting has no int8 kernel)"
            return None
        other = b if tensors[0] is a else a
        if not isinstance(other, numbers.Real) or isinstance(other, bool):
            return f"operand {other!r} is neither a tensor nor a number"
        return None

    @staticmethod
    def quant_inputs(node):
        return _tensor_args(node)

    @staticmethod
    def kind_of(node, default):
        return default if len(_tensor_args(node)) == 2 else "passthrough"

    @staticmethod
    def build(node, ctx):
        tensors = _tensor_args(node)
        if len(tensors) == 1:
            t = tensors[0]
            value = node.args[1] if node.args[0] is t else node.args[0]
            return QScalar(ctx.op(node), value, scalar_first=node.args[0] is not t), (t,)
        qp = ctx.out_qparams(node)
        fn = "add_relu" if node.target is add_relu else ctx.op(node)
        return QBinary(fn, qp.scale, qp.zero_point), tuple(node.args)


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
