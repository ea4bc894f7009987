"""EmbeddingBag: 8-bit row-wise weights, ``quantized::embedding_bag_byte`` (``embedding_bag_byte_rowwise_offsets``).

The table is stored as uint8 rows, each with its own float scale and zero point (as ``QEmbedding``), looked up and
reduced into a float output (``weight_only`` kind: indices in, float out, nothing calibrated).

**Engines are checked, not trusted.** PyTorch's int8 bag op takes a ``mode`` argument but computes a *sum* whatever
it says (torch 2.13, 100 x 16 table, 3 bags of 12 indices, against ``F.embedding_bag`` on the same 8-bit rows:
sum 143 dB, mean -8.9 dB, max -1.6 dB; ``torch.ao.nn.quantized.EmbeddingBag`` passes mode 0 and gets the same). So:

* ``mode="sum"`` (with or without ``per_sample_weights``): the op as is (48 dB vs the float table: the rows' rounding);
* ``mode="mean"``: the op's sum divided by each bag's size in fp32 (an empty bag stays 0, as in float), 48 dB;
* ``mode="max"``: no int8 kernel, runs in float (``check`` gives the measurement);
* ``padding_idx`` and ``max_norm``: the int8 op has neither; runs in float.

The engines (OpenVINO, ONNX Runtime) get the float layer in the QDQ graph and run it in float (``explain()`` says so).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ....capture import attr_at
from .base import KernelImpl, PackedKernelModule, kernel_module
from .registry import register
from .transformer import embedding_qparams

#: F.embedding_bag's positional parameters, in order
_FUNCTION_ARGS = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
                  "per_sample_weights", "include_last_offset", "padding_idx")
#: measured: what the int8 op computes for mode='max' (module docstring)
MAX_REASON = ("EmbeddingBag(mode='max') runs in float: PyTorch's int8 bag op sums whatever mode it is given "
              "(measured -1.6 dB against the float max on the same 8-bit rows)")


@kernel_module
class QEmbeddingBag(PackedKernelModule):
    """``quantized::embedding_bag_byte`` over 8-bit rows (scale and zero point per row): a sum, divided by each bag's
    size in fp32 for ``mode="mean"``."""

    def __init__(self, weight_uint8: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, mode: str = "sum",
                 include_last_offset: bool = False):
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"QEmbeddingBag computes mode 'sum' or 'mean', got {mode!r}")
        self.mode, self.include_last_offset = mode, bool(include_last_offset)
        self.register_buffer("weight_uint8", weight_uint8.to(torch.uint8))
        self.register_buffer("scales", scales.float())
        self.register_buffer("zero_points", zero_points.float())
        wf = (self.weight_uint8.float() - self.zero_points[:, None]) * self.scales[:, None]
        qw = torch.quantize_per_channel(wf, self.scales, self.zero_points, 0, torch.quint8)
        self._packed = torch.ops.quantized.embedding_bag_prepack(qw)

    @classmethod
    def from_float(cls, weight: torch.Tensor, mode: str = "sum", include_last_offset: bool = False):
        w = weight.detach().float()
        scales, zps = embedding_qparams(w)
        qw = torch.quantize_per_channel(w, scales, zps, 0, torch.quint8)
        return cls(qw.int_repr(), scales, zps, mode, include_last_offset)

    def forward(self, indices, offsets=None, per_sample_weights=None):
        if indices.dim() == 2:  # fixed-size bags, one per row (F.embedding_bag takes no offsets then)
            size = indices.shape[1]
            offsets = torch.arange(0, indices.numel(), size, dtype=indices.dtype) if size else None
            if size == 0:
                return torch.zeros(indices.shape[0], self.weight_uint8.shape[1])
            indices = indices.reshape(-1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
            include_last = False
        else:
            include_last = self.include_last_offset
        y = torch.ops.quantized.embedding_bag_byte(self._packed, indices.contiguous(), offsets, False, 0, False,
                                                   per_sample_weights, None, include_last)
        if self.mode == "mean":
            ends = offsets[1:] if include_last else torch.cat([offsets[1:], offsets.new_tensor([indices.numel()])])
            starts = offsets[:-1] if include_last else offsets
            y = y / (ends - starts).clamp_min(1).to(y.dtype)[:, None]
        return y

    def spec(self):
        return ({"mode": self.mode, "include_last_offset": self.include_last_offset},
                {"weight_uint8": self.weight_uint8, "scales": self.scales, "zero_points": self.zero_points})

    def extra_repr(self):
        return f"{tuple(self.weight_uint8.shape)}, 8-bit rows, mode={self.mode}"


def bag_call(node: fx.Node, ctx) -> dict | str:
    """What an embedding-bag call computes: ``weight``, ``mode``, ``include_last_offset``, ``padding_idx``,
    ``max_norm`` and the fx args ``indices``, ``offsets``, ``per_sample_weights``; or a str saying why it has no int8
    kernel."""
    if node.op == "call_module":
        m = ctx.module(node)
        if not isinstance(m, nn.EmbeddingBag):
            return f"{type(m).__name__} is not an nn.EmbeddingBag"
        names = ("input", "offsets", "per_sample_weights")
        vals = dict(zip(names, node.args))
        vals.update(node.kwargs)
        return dict(weight=m.weight, mode=m.mode, include_last_offset=m.include_last_offset, padding_idx=m.padding_idx,
                    max_norm=m.max_norm, indices=vals.get("input"), offsets=vals.get("offsets"),
                    per_sample_weights=vals.get("per_sample_weights"))
    vals = dict(zip(_FUNCTION_ARGS, node.args))
    vals.update(node.kwargs)
    w = vals.get("weight")
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return "F.embedding_bag of a weight computed at run time has no int8 kernel (a parameter/buffer has)"
    return dict(weight=attr_at(ctx.gm, w.target), mode=vals.get("mode", "mean"),
                include_last_offset=vals.get("include_last_offset", False), padding_idx=vals.get("padding_idx"),
                max_norm=vals.get("max_norm"), indices=vals.get("input"), offsets=vals.get("offsets"),
                per_sample_weights=vals.get("per_sample_weights"))


@register("embedding_bag", kind="weight_only", engines=("native",),
          notes="quantized::embedding_bag_byte: 8-bit rows (scale and zero point per row); sum (per_sample_weights "
                "too) and mean (the sum divided by bag sizes in fp32); max stays float; float output")
class EmbeddingBagKernel(KernelImpl):
    @staticmethod
    def check(node, ctx):
        call = bag_call(node, ctx)
        if isinstance(call, str):
            return call
        w = call["weight"]
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            return "its weight is not a 2-D floating-point tensor"
        if call["mode"] == "max":
            return MAX_REASON
        if call["mode"] not in ("sum", "mean"):
            return f"EmbeddingBag mode {call['mode']!r} has no int8 kernel"
        if call["padding_idx"] is not None:
            return "EmbeddingBag with padding_idx: PyTorch's int8 bag op has no padding index; runs in float"
        if call["max_norm"] is not None:
            return "EmbeddingBag with max_norm renormalizes its weight at run time; no int8 kernel"
        idx = ctx.meta(call["indices"])
        if idx is None or idx.dtype not in (torch.int64, torch.int32):
            return "its indices are not an int64/int32 tensor"
        if len(idx.shape) not in (1, 2):
            return f"its indices have {len(idx.shape)} dims (1-D with offsets or 2-D bags have an int8 kernel)"
        if len(idx.shape) == 1 and not isinstance(call["offsets"], fx.Node):
            return "1-D indices without an offsets tensor; runs in float"
        offsets = ctx.meta(call["offsets"]) if isinstance(call["offsets"], fx.Node) else None
        if offsets is not None and offsets.dtype != idx.dtype:
            return f"its offsets ({offsets.dtype}) and indices ({idx.dtype}) differ in dtype; runs in float"
        psw = call["per_sample_weights"]
        if psw is not None:
            meta = ctx.meta(psw)
            if meta is None or meta.dtype != torch.float32:
                return "its per_sample_weights are not a float32 tensor; runs in float"
        return None

    @staticmethod
    def quant_inputs(node):
        return []  # indices, offsets: integers; per_sample_weights: applied in the kernel's fp32 accumulation

    @staticmethod
    def note(node, ctx):
        mode = bag_call(node, ctx)["mode"]
        return f"8-bit rows, mode={mode}" + (" (sum / bag size in fp32)" if mode == "mean" else "") + ", float output"

    @staticmethod
    def build(node, ctx):
        call = bag_call(node, ctx)
        kernel = QEmbeddingBag.from_float(call["weight"], call["mode"], call["include_last_offset"])
        return kernel, (call["indices"], call["offsets"], call["per_sample_weights"])
