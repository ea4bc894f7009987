"""BatchNorm that could not be folded into a conv/linear (e.g. conv -> relu -> BN), as its own int8 op."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ....nn import FusedBatchNorm
from .base import KernelImpl, KernelModule, input_meta, kernel_module
from .registry import register

_OPS = {(3, False): torch.ops.quantized.batch_norm1d, (4, False): torch.ops.quantized.batch_norm2d,
        (3, True): torch.ops.quantized.batch_norm1d_relu, (4, True): torch.ops.quantized.batch_norm2d_relu}


@kernel_module
class QBatchNorm(KernelModule):
    """quantized::batch_norm1d/2d[_relu] (eval statistics) requantized to calibrated output params."""

    def __init__(self, rank: int, weight, bias, running_mean, running_var, eps: float, out_scale: float,
                 out_zero_point: int, relu: bool = False):
        super().__init__()
        self.rank, self.eps, self.relu = int(rank), float(eps), bool(relu)
        self.out_scale, self.out_zero_point = float(out_scale), int(out_zero_point)
        for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var)):
            self.register_buffer(name, t.detach().float().clone())
        self._f = _OPS[(self.rank, self.relu)]

    @classmethod
    def from_float(cls, mod: nn.Module, rank: int, out_scale: float, out_zero_point: int):
        relu = isinstance(mod, FusedBatchNorm)
        bn = mod.bn if relu else mod
        c = bn.num_features
        weight = bn.weight if bn.affine else torch.ones(c)
        bias = bn.bias if bn.affine else torch.zeros(c)
        return cls(rank, weight, bias, bn.running_mean, bn.running_var, bn.eps, out_scale, out_zero_point, relu)

    def forward(self, x):
        return self._f(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.out_scale,
                       self.out_zero_point)

    def spec(self):
        return (dict(rank=self.rank, eps=self.eps, out_scale=self.out_scale, out_zero_point=self.out_zero_point,
                     relu=self.relu),
                {k: getattr(self, k) for k in ("weight", "bias", "running_mean", "running_var")})

    def extra_repr(self):
        return (f"{self.weight.numel()} channels{', fused=relu' if self.relu else ''}, out_scale={self.out_scale:.4g}, "
                f"zp={self.out_zero_point}")


@register("batch_norm", kind="compute", engines=("native",),
          notes="a BatchNorm that cannot be folded (e.g. after a relu), requantized to calibrated output params")
class BatchNormKernel(KernelImpl):
    needs_int8_input = True

    @staticmethod
    def check(node: fx.Node, ctx) -> str | None:
        mod = ctx.module(node) if node.op == "call_module" else None
        bn = mod.bn if isinstance(mod, FusedBatchNorm) else mod
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return "functional batch_norm has no int8 kernel (the nn.BatchNorm1d/2d module does)"
        if not bn.track_running_stats or bn.running_mean is None:
            return "it normalises with batch statistics, which have no int8 kernel"
        meta = input_meta(node, ctx)
        if meta is None or not meta.is_float or len(meta.shape) not in (3, 4):
            return "int8 BatchNorm needs an (N, C, L) or (N, C, H, W) floating-point input"
        return None

    @staticmethod
    def build(node, ctx):
        qp = ctx.out_qparams(node)
        rank = len(ctx.meta(node.args[0]).shape)
        return QBatchNorm.from_float(ctx.module(node), rank, qp.scale, qp.zero_point), (node.args[0],)

    @staticmethod
    def note(node, ctx) -> str:
        why = node.meta.get("qcast_unfolded")
        return f"not folded: {why}" if why else ""
