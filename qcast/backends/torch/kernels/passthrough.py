"""Ops that run on the quantized tensor as is, with no requantization (params pass through); a global average is
the exception (``AverageKernel``: requantized to its own params)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ....capture import TensorMeta
from ....observers import QParams
from .base import KernelImpl, KernelModule, input_meta, kernel_module, not_float_input
from .registry import register


class Passthrough(KernelImpl):
    needs_int8_input = True
    #: call_method renames applied when lowering (int8 conv outputs are channels-last: view -> reshape)
    rename: dict[str, str] = {}


@register("flatten", "reshape", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "chunk", "split",
          "getitem", kind="passthrough", engines=("native",), notes="shape op on the int8 tensor")
class ShapeKernel(Passthrough):
    pass


@register("view", kind="passthrough", engines=("native",), notes="lowered to reshape (int8 tensors may be channels-last)")
class ViewKernel(Passthrough):
    rename = {"view": "reshape"}


@register("relu", "relu6", "hardtanh", kind="passthrough", engines=("native",), notes="clamp in the int8 domain")
class ClampKernel(Passthrough):
    pass


@register("max_pool", "avg_pool", kind="passthrough", engines=("native",),
          notes="pooling in the int8 domain")
class PoolKernel(Passthrough):
    @staticmethod
    def check(node, ctx):
        if node.op == "call_module":
            m = ctx.module(node)
            if getattr(m, "return_indices", False):
                return "max pooling with return_indices has no int8 kernel"
        elif node.kwargs.get("return_indices"):
            return "max pooling with return_indices has no int8 kernel"
        meta = input_meta(node, ctx)
        if meta is None or len(meta.shape) not in (3, 4):
            return "pooling on this input rank has no int8 kernel"
        return None


@register("interpolate", kind="passthrough", engines=("native",), notes="nearest / bilinear resize in the int8 domain")
class InterpolateKernel(Passthrough):
    @staticmethod
    def check(node, ctx):
        if node.op == "call_module":
            m = ctx.module(node)
            mode = m.mode if isinstance(m, nn.Upsample) else "nearest"
        else:
            mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
            if node.kwargs.get("antialias"):
                return "antialiased resize has no int8 kernel"
        if mode not in ("nearest", "bilinear"):
            return f"interpolate mode={mode!r} has no int8 kernel (nearest and bilinear do)"
        meta = input_meta(node, ctx)
        if meta is None or len(meta.shape) != 4:
            return "resize on a non-4-D input has no int8 kernel"
        return None


@kernel_module
class QAverage(KernelModule):
    """A global average (adaptive_avg_pool / mean) on the dequantized input, requantized to calibrated params
    (``float_out``: left in fp32, where no int8 op reads it)."""

    def __init__(self, how: str, sizes, keepdim: bool, out_scale: float, out_zero_point: int, float_out: bool = False):
        super().__init__()
        self.how, self.sizes, self.keepdim = how, [None if s is None else int(s) for s in sizes], bool(keepdim)
        self.out_scale, self.out_zero_point = float(out_scale), int(out_zero_point)
        self.float_out = bool(float_out)

    def forward(self, x):
        y = x.dequantize()
        if self.how == "mean":
            y = y.mean(self.sizes, keepdim=self.keepdim)
        elif y.dim() == 3:
            y = torch.nn.functional.adaptive_avg_pool1d(y, self.sizes)
        else:
            y = torch.nn.functional.adaptive_avg_pool2d(y, self.sizes)
        if self.float_out:
            return y
        return torch.quantize_per_tensor(y, self.out_scale, self.out_zero_point, torch.quint8)

    def spec(self):
        config = dict(how=self.how, sizes=self.sizes, keepdim=self.keepdim, out_scale=self.out_scale,
                      out_zero_point=self.out_zero_point)
        if self.float_out:  # absent in files written before placement
            config["float_out"] = True
        return config, {}

    def extra_repr(self):
        return f"{self.how} {self.sizes}, " + ("fp32 out" if self.float_out else
                                               f"out_scale={self.out_scale:.4g}, zp={self.out_zero_point}")


@register("adaptive_avg_pool", "mean", kind="passthrough", engines=("native",),
          notes="average pooling / mean over dims; a global average (>= 4 inputs per output) is requantized")
class AverageKernel(Passthrough):
    """Averages stay inside their input's range, so they can keep the input's params. But a global average
    (the head of most CNNs: ``adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))``) is far finer than one input step:
    rounding it to the input's step cost 10 dB on a conv -> mean -> linear model, 7 dB on a DenseNet-like net and
    0.4 dB on ResNet-18 / MobileNetV2. So when each output averages >= 4 inputs, the average is computed on the
    dequantized input and requantized to its own calibrated params (the input map is small there)."""

    @staticmethod
    def check(node, ctx):
        if ctx.op(node) == "mean" and (node.kwargs.get("dtype") is not None
                                      or (len(node.args) > 3 and node.args[3] is not None)):
            return "mean with a dtype= argument has no int8 kernel"
        reason = not_float_input(node, ctx)
        if reason:
            return reason
        meta = input_meta(node, ctx)
        if ctx.op(node) == "adaptive_avg_pool" and len(meta.shape) not in (3, 4):
            return "pooling on this input rank has no int8 kernel"
        return None

    @staticmethod
    def kind_of(node, default):
        inp, out = node.args[0].meta.get("qcast_val"), node.meta.get("qcast_val")
        if isinstance(inp, TensorMeta) and isinstance(out, TensorMeta) and math.prod(out.shape) * 4 <= math.prod(inp.shape):
            return "compute"
        return default

    @staticmethod
    def float_output(node) -> bool:
        return True

    @staticmethod
    def build(node, ctx):
        float_out = ctx.plan(node).float_out
        qp = QParams(1.0, 0) if float_out else ctx.out_qparams(node)
        rank = len(ctx.meta(node.args[0]).shape)
        if ctx.op(node) == "mean":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            dims = list(range(rank)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
            return QAverage("mean", dims, bool(keepdim), qp.scale, qp.zero_point, float_out), (node.args[0],)
        if node.op == "call_module":
            size = ctx.module(node).output_size
        else:
            size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
        size = [size] * (rank - 2) if isinstance(size, int) or size is None else list(size)
        return QAverage("adaptive_avg_pool", size, False, qp.scale, qp.zero_point, float_out), (node.args[0],)

    @staticmethod
    def note(node, ctx) -> str:
        return "a global average, computed in float on the dequantized input" if \
            ctx.plan(node).kind == "compute" else ""


@register("pad", kind="passthrough", engines=("native",), notes="constant zero padding in the int8 domain")
class PadKernel(Passthrough):
    """Zero padding writes the zero point: exact, since every calibrated range contains 0."""

    @staticmethod
    def check(node, ctx):
        if node.op == "call_module":
            m = ctx.module(node)
            value = getattr(m, "value", 0.0)
            mode = "constant"
        else:
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if mode != "constant":
            return f"padding mode={mode!r} has no int8 kernel (constant zero padding does)"
        if value not in (None, 0, 0.0):
            return f"padding with value={value!r} has no int8 kernel (the value may lie outside the int8 range)"
        return None
