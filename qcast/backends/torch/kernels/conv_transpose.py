"""conv_transpose1d / conv_transpose2d (decoders, U-Nets, FPNs) on PyTorch's int8 kernels.

PyTorch has ``quantized::conv_transpose1d/2d`` with prepacked weights. Measured on this machine's Intel Xeon with AMX
(torch 2.13, a 8 -> 6 channel 3x3 stride-2 layer against the same int8 values computed in float): fbgemm is exact to
its 8-bit output (40-44 dB, as a requantized conv2d); oneDNN and x86 return wrong values (-1.6 to -2.2 dB) with zero
output padding, and oneDNN refuses a non-zero ``output_padding`` ("ONEDNN only supports zero output_padding"); no
engine takes per-channel weights ("Per Channel Quantization is currently disabled for transposed conv"). So a
transposed conv has **per-tensor** symmetric int8 weights (one scale, ``max|w| / 127``; ``convert.to_qdq`` puts the
QDQ graph's weight on that grid, so OpenVINO and ONNX Runtime lower the same values), runs on the first engine whose
probe (``ConvKernel._try``'s check: a seeded input of the calibration shape against exact int8 arithmetic) passes, and
``explain()`` says which engines were rejected and why. Its output, where no int8 op reads it, is computed in fp32 from
the int8 input and weights (no engine has an fp32-output int8 transposed conv), as other engines' fp32-output convs.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ....observers import fake_quant_tensor, tensor_grid
from .base import (KernelImpl, PackedKernelModule, check_probe, first_engine, input_meta, kernel_module,
                   not_float_input)
from .engines import REDUCE_RANGE, auto_order, engine_scope
from .registry import register

TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d)
_FN = {"conv_transpose1d": torch.nn.functional.conv_transpose1d, "conv_transpose2d": torch.nn.functional.conv_transpose2d}
_OPS = {"conv_transpose1d": (torch.ops.quantized.conv_transpose1d_prepack, torch.ops.quantized.conv_transpose1d),
        "conv_transpose2d": (torch.ops.quantized.conv_transpose2d_prepack, torch.ops.quantized.conv_transpose2d)}


def _kind(mod: nn.Module) -> str:
    return "conv_transpose1d" if isinstance(mod, nn.ConvTranspose1d) else "conv_transpose2d"


@kernel_module
class QConvTranspose(PackedKernelModule):
    """Int8 transposed conv: quint8 activations, per-tensor qint8 weights, float bias; requantized output, or fp32
    (computed in float from the int8 values) where no int8 op reads it."""

    def __init__(self, kind, weight_int8, weight_scale, bias=None, stride=(1,), padding=(0,), output_padding=(0,),
                 dilation=(1,), groups=1, out_scale=1.0, out_zero_point=0, engine="fbgemm", float_out=False):
        super().__init__()
        self.kind, self.engine, self.float_out = kind, engine, bool(float_out)
        self.stride, self.padding, self.output_padding = tuple(stride), tuple(padding), tuple(output_padding)
        self.dilation, self.groups = tuple(dilation), int(groups)
        self.out_scale, self.out_zero_point = float(out_scale), int(out_zero_point)
        self.register_buffer("weight_int8", weight_int8.to(torch.int8))
        self.register_buffer("weight_scale", torch.as_tensor(weight_scale, dtype=torch.float32).reshape(()))
        self.register_buffer("bias", None if bias is None else bias.float())
        self._packed = None
        if not self.float_out:
            prepack, self._fn = _OPS[kind]
            wq = torch._make_per_tensor_quantized_tensor(self.weight_int8, float(self.weight_scale), 0)
            with engine_scope(engine):
                self._packed = prepack(wq, self.bias, list(self.stride), list(self.padding), list(self.output_padding),
                                       list(self.dilation), self.groups)

    @classmethod
    def from_float(cls, mod: nn.Module, out_scale: float | None, out_zero_point: int | None, engine: str):
        """``out_scale=None``: an fp32 output (no int8 op reads it)."""
        wq, scale = tensor_grid(mod.weight)
        float_out = out_scale is None
        return cls(_kind(mod), wq, scale, mod.bias.detach() if mod.bias is not None else None, stride=mod.stride,
                   padding=mod.padding, output_padding=mod.output_padding, dilation=mod.dilation, groups=mod.groups,
                   out_scale=1.0 if float_out else out_scale, out_zero_point=0 if float_out else out_zero_point,
                   engine=engine, float_out=float_out)

    def forward(self, x):
        if self.float_out:
            w = self.weight_int8.float() * self.weight_scale
            return _FN[self.kind](x.dequantize(), w, self.bias, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)
        return self._fn(x, self._packed, self.out_scale, self.out_zero_point)

    def input_mismatch(self, x) -> str | None:
        rank = 3 if self.kind == "conv_transpose1d" else 4
        if x.dim() != rank:
            return f"expects a rank-{rank} input (batch, channels, ...), got rank {x.dim()} {list(x.shape)}"
        if x.shape[1] != self.weight_int8.shape[0]:
            return f"expects {self.weight_int8.shape[0]} input channels (dim 1), got {x.shape[1]} (its input is {list(x.shape)})"
        return None

    def spec(self):
        config = dict(kind=self.kind, stride=list(self.stride), padding=list(self.padding),
                      output_padding=list(self.output_padding), dilation=list(self.dilation), groups=self.groups,
                      out_scale=self.out_scale, out_zero_point=self.out_zero_point, engine=self.engine,
                      float_out=self.float_out)
        tensors = {"weight_int8": self.weight_int8, "weight_scale": self.weight_scale}
        if self.bias is not None:
            tensors["bias"] = self.bias
        return config, tensors

    def extra_repr(self):
        return (f"{self.kind}, weight={tuple(self.weight_int8.shape)} per-tensor, engine={self.engine}"
                + (", fp32 out" if self.float_out else f", out_scale={self.out_scale:.4g}, zp={self.out_zero_point}"))


@register("conv_transpose1d", "conv_transpose2d", kind="compute", engines=("fbgemm", "x86", "onednn"),
          notes="per-tensor s8 weights (no engine takes per-channel ones), u8 activations; each engine probed "
                "(onednn/x86 compute it wrong on AMX, fbgemm is exact: 7-bit inputs); fp32 output computed in float "
                "from the int8 values")
class ConvTransposeKernel(KernelImpl):
    #: how explain() describes its weights (plan.py)
    weights = "per-tensor s8 weights"

    @staticmethod
    def check(node: fx.Node, ctx) -> str | None:
        if node.op != "call_module":
            why = node.meta.get("qcast_functional") or "its weight is not a parameter or buffer of the model"
            return f"F.{ctx.op(node)}: {why}"  # passes/functional_layers.py made a layer of every one it could
        mod = ctx.module(node)
        if mod.padding_mode != "zeros":
            return f"padding_mode={mod.padding_mode!r} has no int8 kernel (only 'zeros')"
        reason = not_float_input(node, ctx)
        if reason:
            return reason
        want = 3 if isinstance(mod, nn.ConvTranspose1d) else 4
        if len(input_meta(node, ctx).shape) != want:
            return f"{ctx.op(node)} on a rank-{len(input_meta(node, ctx).shape)} input has no int8 kernel (batched input expected)"
        if len(node.args) != 1 or node.kwargs:
            return f"{ctx.op(node)} called with an output_size has no int8 kernel"
        return None

    @staticmethod
    def engine(node: fx.Node, ctx) -> str:
        """The config's engine, or (``auto``) the first engine of ``auto_order`` whose probe passes."""
        wanted = ctx.setting(node, "engine")
        candidates = auto_order() if wanted == "auto" else [wanted]  # explain() gives each rejected engine's figure
        mod, shape = ctx.module(node), ctx.meta(node.args[0]).shape
        return first_engine(node, candidates, lambda eng: ConvTransposeKernel._try(mod, shape, eng),
                            "no int8 engine computes this layer right")

    @staticmethod
    def _try(mod: nn.Module, shape, engine: str) -> None:
        """Run the layer's int8 kernel on ``engine`` on a seeded input of the calibration shape (batch 1) against the
        same int8 values computed in float."""
        g = torch.Generator().manual_seed(0)
        x = torch.quantize_per_tensor(torch.rand((1,) + tuple(shape[1:]), generator=g) * 2 - 1, 2 / 255, 128,
                                      torch.quint8)
        with torch.no_grad():
            ref = _FN[_kind(mod)](x.dequantize(), fake_quant_tensor(mod.weight), mod.bias, mod.stride, mod.padding,
                                  mod.output_padding, mod.groups, mod.dilation)
        span = float(ref.abs().max()) or 1.0
        q = QConvTranspose.from_float(mod, 2 * span / 255, 128, engine)
        check_probe(ref, q(x).dequantize())

    @staticmethod
    def reduce_range(engine: str) -> bool:
        return REDUCE_RANGE.get(engine, True)

    @staticmethod
    def float_output(node) -> bool:
        return True

    @staticmethod
    def build(node, ctx):
        plan = ctx.plan(node)
        if plan.float_out:
            return QConvTranspose.from_float(ctx.module(node), None, None, plan.engine), tuple(node.args)
        qp = ctx.out_qparams(node)
        return QConvTranspose.from_float(ctx.module(node), qp.scale, qp.zero_point, plan.engine), tuple(node.args)
