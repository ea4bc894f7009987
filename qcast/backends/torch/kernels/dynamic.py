"""Per-token dynamic int8 linear: ``QuantConfig(activation="dynamic")`` (globally or per layer).

Each row of the input (a token, for a transformer) gets its own 8-bit range, computed at run time from that row's
[min, max]; weights are per-output-channel symmetric int8, quantized once at convert. Kernel, chosen by measurement
(one 1024 x 384 -> 1536 linear, interleaved; ``torch._int_mm`` with an explicit quantize and rescale took 2-3x longer
than this, which has the fewest passes over the data): each row is mapped affinely onto exactly [-1/2, 1/2]
(``(x - c) / w``, ``c`` and ``w`` the centre and width of its [min, max]), fbgemm quantizes it over that fixed range
(``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` with scale 1/255 and zero point 128, given explicitly:
the grid ``quantized::linear_dynamic`` picks for [-1, 1], without its min/max pass), accumulates u8 x s8 in int32
and writes fp32, and the output rows are mapped back (``w * y + c * rowsum(W) + b``). Every row spans the same range, so the result is that of quantizing each row by itself: a token's output
does not depend on what else is in the batch (padding included). A symmetric variant (rows divided by max |x|) let
fbgemm's common range depend on the batch and moved a padded sentence's embedding (cosine 0.9974 to itself unpadded). Nothing is calibrated for
the input, so a token whose values are 10x larger than the rest (BERT's outlier tokens) costs only its own row's
resolution, and the op needs no observer: it is a ``weight_only`` entry (float in, float out) whose explain() row says
what it does. Only ops with a registered ``<op>:dynamic`` kernel run this way; every other op keeps its static kernel.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ....nn import FusedConv
from ....observers import qmax_bound, weight_scales
from ....smooth import Smooth
from .base import KernelImpl, PackedKernelModule, kernel_module, not_float_input
from .engines import available, engine_scope
from .registry import register

_GEMM = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32  # float in, u8 x s8 -> s32, float out
_UNIT_SCALE, _UNIT_ZERO_POINT = 1.0 / 255.0, 128  # 8 bits over [-1/2, 1/2] (fbgemm's choice for [-1, 1], halved)
_ACTS = {"": None, "relu": torch.relu, "relu6": lambda y: y.clamp_(0.0, 6.0)}


@kernel_module
class QLinearDynamic(PackedKernelModule):
    """``y = w * gemm((x - c) / w, W_q) + c * rowsum(W_q) + b`` with ``c, w`` the centre and width of each row's
    [min, max]: per-token asymmetric 8-bit activations (every row spans the GEMM's fixed [-1/2, 1/2] range, so rows
    never affect each other), per-channel s8 weights, int32 accumulation (fbgemm)."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 act: str = "", input_scale: torch.Tensor | None = None, splits: list[int] | None = None,
                 members: list[str] | None = None):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"unknown fused activation {act!r}")
        self.act = act
        self.out_features, self.in_features = weight_int8.shape
        # several linears reading the same input, stacked (fuse_siblings): one GEMM, a tuple of outputs
        self.splits = [int(n) for n in splits] if splits else None
        if self.splits and sum(self.splits) != self.out_features:
            raise ValueError(f"splits {self.splits} do not add up to out_features={self.out_features}")
        self.members = [str(m) for m in members] if members else None  # the stacked linears' module paths
        self.register_buffer("weight_int8", weight_int8.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        # SmoothQuant's per-channel 1/s (qcast.smooth.Smooth), applied here instead of by a separate module: the
        # product is then a temporary the row mapping may overwrite (measured: ~0.3 ms less per 1024-token linear)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float())
        w = torch.quantize_per_channel(self.weight_int8.float() * self.weight_scale[:, None], self.weight_scale,
                                       torch.zeros(self.out_features, dtype=torch.long), 0, torch.qint8)
        with engine_scope("fbgemm"):
            self._packed = torch.ops.quantized.linear_prepack(w, None)
        self._wsum = (self.weight_int8.float().sum(1) * self.weight_scale)  # rowsum of the dequantized int8 weight
        bounds, start = [], 0
        for n in self.splits or ():
            bounds.append((start, start + n, self._wsum[start:start + n],
                           None if self.bias is None else self.bias[start:start + n]))
            start += n
        self._parts = bounds

    @classmethod
    def from_float(cls, linear: nn.Linear, act: str = "", qmax: int = 127) -> "QLinearDynamic":
        w = linear.weight.detach().float()
        scale = weight_scales(w, qmax)
        bound = qmax_bound(qmax)
        w_int = torch.round(w / scale[:, None]).clamp_(-bound, bound).to(torch.int8)
        return cls(w_int, scale, linear.bias, act)

    def forward(self, x: torch.Tensor):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        owned = self.input_scale is not None
        if owned:
            x2 = x2 * self.input_scale
        # amax + amin, not aminmax(dim=1): 0.14 vs 3.5 ms on 1024 x 1536 (one thread); likewise sub + mul_ and the
        # in-place epilogue below beat addcmul / addr + addcmul by 2-4x (measured, torch 2.13)
        hi, lo = x2.amax(dim=1, keepdim=True), x2.amin(dim=1, keepdim=True)
        mid = torch.lerp(lo, hi, 0.5)  # each row's centre c and width w: x = c + w * x', x' in [-1/2, 1/2]
        width = hi.sub_(lo).clamp_min_(1e-12)
        unit = (x2.sub_(mid) if owned else x2 - mid).mul_(width.reciprocal())  # mul: ~3% faster than div_
        # every row now spans exactly [-1/2, 1/2]: quantize it to 8 bits over that range (scale 1/255, zero point
        # 128: the grid fbgemm's dynamic linear picks for [-1, 1], halved), given explicitly so fbgemm skips a
        # min/max pass over the input; u8 x s8 products accumulate in int32 and come out in fp32
        y = _GEMM(unit, _UNIT_SCALE, _UNIT_ZERO_POINT, self._packed)
        # W x + b = w * (W x') + c * rowsum(W) + b, with W the int8 weight the GEMM used
        mid = mid.view(-1)
        if self.splits is None:
            return self._finish(y.mul_(width), mid, self._wsum, self.bias).reshape(*lead, self.out_features)
        # each output: a contiguous copy of its columns, rescaled in the same pass
        return tuple(self._finish(torch.mul(y[:, a:b], width), mid, wsum, bias).reshape(*lead, b - a)
                     for a, b, wsum, bias in self._parts)

    def _finish(self, y: torch.Tensor, mid: torch.Tensor, wsum: torch.Tensor, bias: torch.Tensor | None):
        y.addr_(mid, wsum)
        if bias is not None:
            y.add_(bias)
        act = _ACTS[self.act]
        return y if act is None else act(y)

    def spec(self):
        tensors = {"weight_int8": self.weight_int8, "weight_scale": self.weight_scale}
        if self.bias is not None:
            tensors["bias"] = self.bias
        if self.input_scale is not None:
            tensors["input_scale"] = self.input_scale
        config = {"act": self.act}
        if self.splits:
            config["splits"] = list(self.splits)
        if self.members:
            config["members"] = list(self.members)
        return config, tensors

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, per-token dynamic int8"
                + (f", fused {self.act}" if self.act else "") + (", SmoothQuant scales" if self.owned_smooth else "")
                + (f", {len(self.splits)} linears stacked {self.splits}" if self.splits else "")
                + (f" ({', '.join(self.members)})" if self.members else ""))

    @property
    def owned_smooth(self) -> bool:
        return self.input_scale is not None


def _linear_and_act(node: fx.Node, ctx) -> tuple[nn.Linear, str] | str:
    if node.op != "call_module":
        return "a functional F.linear has no per-token dynamic kernel (an nn.Linear module has)"
    mod = ctx.module(node)
    act = ""
    if isinstance(mod, FusedConv):
        if mod.add:
            return "a linear with a fused residual add has no per-token dynamic kernel"
        act, mod = mod.act or "", mod.conv
    if type(mod) is not nn.Linear:
        return f"{type(mod).__name__} is not an nn.Linear"
    if act not in _ACTS:
        return f"a linear fused with {act} has no per-token dynamic kernel"
    return mod, act


@register("linear:dynamic", kind="weight_only", engines=("fbgemm",),
          notes="QuantConfig(activation='dynamic'/'auto'): per-token 8-bit activations scaled at run time, per-channel "
                "s8 weights, fbgemm dynamic GEMM (s32 accumulate); float in and out")
class LinearDynamicKernel(KernelImpl):
    @staticmethod
    def check(node, ctx):
        if "fbgemm" not in available():  # e.g. ARM builds of PyTorch: the static int8 linear runs instead
            return "per-token dynamic linears need PyTorch's fbgemm engine, which this build lacks (ARM)"
        got = _linear_and_act(node, ctx)
        if isinstance(got, str):
            return got
        return not_float_input(node, ctx)

    @staticmethod
    def quant_inputs(node):
        return []  # scaled per token at run time: nothing to calibrate

    @staticmethod
    def note(node, ctx):
        return "per-token dynamic int8 activations (fbgemm, int32 accumulate)"

    @staticmethod
    def build(node, ctx):
        linear, act = _linear_and_act(node, ctx)
        q = QLinearDynamic.from_float(linear, act, getattr(linear, "qcast_weight_qmax", 127))
        x = node.args[0]
        smooth = ctx.modules.get(x.target) if isinstance(x, fx.Node) and x.op == "call_module" else None
        if isinstance(smooth, Smooth) and len(x.users) == 1 and smooth.inv_s.numel() == linear.in_features:
            # its only consumer: the kernel applies 1/s itself (the float Smooth node is then dropped by convert)
            q.register_buffer("input_scale", smooth.inv_s.detach().float().clone())
            x = x.args[0]
        return q, (x,)


def fuse_siblings(graph: fx.Graph, root: dict) -> int:
    """Stack the per-token linears that read the same tensor (a transformer's query, key and value) into one
    ``QLinearDynamic`` with ``splits``: one row mapping and one GEMM instead of three (a 384-wide GEMM runs at ~60%
    of the per-column speed of a 1152-wide one, measured). Same numbers: int32 accumulation per output column is
    unchanged by stacking. Members need the same activation and the same SmoothQuant scales (``calibrate()``
    gives siblings a joint scale). Each member's node becomes a ``getitem`` of the stacked output and keeps its
    name, so explain() and compare() still see it. Returns how many stacks were made."""
    import operator

    groups: dict[tuple, list[fx.Node]] = {}
    for n in graph.nodes:
        mod = root.get(n.target) if n.op == "call_module" else None
        if type(mod) is QLinearDynamic and not mod.splits and len(n.args) == 1 and not n.kwargs \
                and isinstance(n.args[0], fx.Node):
            groups.setdefault((n.args[0], mod.act, mod.in_features), []).append(n)
    count = 0
    for nodes in groups.values():
        while len(nodes) > 1:
            first = root[nodes[0].target]
            same = [n for n in nodes if _same_input_scale(root[n.target], first)]
            nodes = [n for n in nodes if n not in same]
            if len(same) < 2:
                continue
            mods = [root[n.target] for n in same]
            bias = None
            if any(m.bias is not None for m in mods):
                bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods])
            stacked = QLinearDynamic(torch.cat([m.weight_int8 for m in mods]), torch.cat([m.weight_scale for m in mods]),
                                     bias, first.act, first.input_scale, [m.out_features for m in mods],
                                     [str(n.target) for n in same])
            target = f"qcast_k.{same[0].target.replace('.', '_')}__stack{len(same)}"
            root[target] = stacked
            with graph.inserting_before(same[0]):
                fused = graph.call_module(target, same[0].args)
            fused.meta["qcast_stack"] = [n.meta.get("qcast_name", n.name) for n in same]
            after = fused
            for i, n in enumerate(same):
                with graph.inserting_after(after):
                    part = graph.call_function(operator.getitem, (fused, i))
                part.meta.update({k: n.meta[k] for k in ("qcast_name", "qcast_op") if k in n.meta})
                n.replace_all_uses_with(part)
                after = part
            for n in same:
                graph.erase_node(n)
            count += 1
    return count


def _same_input_scale(a: QLinearDynamic, b: QLinearDynamic) -> bool:
    if a.input_scale is None or b.input_scale is None:
        return a.input_scale is None and b.input_scale is None
    return a.input_scale.shape == b.input_scale.shape and torch.equal(a.input_scale, b.input_scale)
