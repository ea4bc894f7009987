"""Ops that run on the quantized tensor as is, with no requantization (params pass through)."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .base import KernelImpl
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


@register("max_pool", "avg_pool", "adaptive_avg_pool", kind="passthrough", engines=("native",),
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
        meta = ctx.meta(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
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
        meta = ctx.meta(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if meta is None or len(meta.shape) != 4:
            return "resize on a non-4-D input has no int8 kernel"
        return None


@register("mean", kind="passthrough", engines=("native",),
          notes="mean over dims (global average pooling written as x.mean((2, 3))) in the int8 domain")
class MeanKernel(Passthrough):
    """A mean stays inside its input's range, so it keeps the input's params (error <= half a step)."""

    @staticmethod
    def check(node, ctx):
        if node.kwargs.get("dtype") is not None or (len(node.args) > 3 and node.args[3] is not None):
            return "mean with a dtype= argument has no int8 kernel"
        meta = ctx.meta(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if meta is None or not meta.is_float:
            return "its input is not a floating-point tensor"
        return None
