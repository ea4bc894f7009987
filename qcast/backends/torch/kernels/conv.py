"""conv1d / conv2d / linear (with folded BN, fused relu/relu6 and residual add) on PyTorch int8 kernels."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ....nn import FusedConv
from ....observers import quantize_weight
from .base import (KernelImpl, PackedKernelModule, check_probe, first_engine, input_meta, kernel_module,
                   not_float_input)
from .engines import REDUCE_RANGE, auto_order, engine_scope
from .registry import register

_OPS = {
    ("conv2d", None): torch.ops.quantized.conv2d.new, ("conv2d", "relu"): torch.ops.quantized.conv2d_relu.new,
    ("conv1d", None): torch.ops.quantized.conv1d, ("conv1d", "relu"): torch.ops.quantized.conv1d_relu,
    ("conv3d", None): torch.ops.quantized.conv3d.new, ("conv3d", "relu"): torch.ops.quantized.conv3d_relu.new,
    ("linear", None): torch.ops.quantized.linear, ("linear", "relu"): torch.ops.quantized.linear_relu,
}


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {"conv1d": torch.nn.functional.conv1d, "conv2d": torch.nn.functional.conv2d,
            "conv3d": torch.nn.functional.conv3d}


def _kind(conv: nn.Module) -> str:
    if isinstance(conv, nn.Linear):
        return "linear"
    return "conv1d" if isinstance(conv, nn.Conv1d) else "conv3d" if isinstance(conv, nn.Conv3d) else "conv2d"


def _split(mod: nn.Module) -> tuple[nn.Module, str | None, bool]:
    if isinstance(mod, FusedConv):
        return mod.conv, mod.act, mod.add
    return mod, None, False


def _pack(kind: str, wq: torch.Tensor, bias, stride, padding, dilation, groups, engine: str):
    with engine_scope(engine):
        if kind == "linear":
            return torch.ops.quantized.linear_prepack(wq, bias)
        prepack = {"conv1d": torch.ops.quantized.conv1d_prepack, "conv2d": torch.ops.quantized.conv2d_prepack,
                   "conv3d": torch.ops.quantized.conv3d_prepack}[kind]
        return prepack(wq, bias, list(stride), list(padding), list(dilation), groups)


def _copy(q: torch.Tensor) -> torch.Tensor:
    """A copy of a quint8 tensor, made as a plain byte copy (``Tensor.clone`` of a quantized tensor is ~10x slower)."""
    out = torch._empty_affine_quantized(q.shape, scale=q.q_scale(), zero_point=q.q_zero_point(), dtype=q.dtype,
                                        memory_format=torch.channels_last if q.dim() == 4 else torch.contiguous_format)
    _bytes(out).copy_(_bytes(q))
    return out


def _bytes(q: torch.Tensor) -> torch.Tensor:
    """The storage of a quint8 tensor as a plain uint8 tensor: same memory, no copy."""
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())


@kernel_module
class QConv(PackedKernelModule):
    """Int8 conv/linear: quint8 activations, per-channel qint8 weights, float bias, fused post-ops."""

    def __init__(self, kind, weight_int8, weight_scales, bias=None, stride=(1,), padding=(0,), dilation=(1,),
                 groups=1, out_scale=1.0, out_zero_point=0, act=None, add=False, clamp6=False, engine="onednn",
                 clone_accum=False, float_out=False):
        super().__init__()
        # no int8 op reads the output: write fp32 (oneDNN's qconv/qlinear_pointwise with an fp32 output dtype)
        self.float_out = bool(float_out)
        # conv2d_add writes its result into the accumulator's storage: clone it when the graph reads it later
        self.clone_accum = bool(clone_accum)
        self.kind, self.act, self.add, self.clamp6, self.engine = kind, act, bool(add), bool(clamp6), engine
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), tuple(padding), tuple(dilation), int(groups)
        self.out_scale, self.out_zero_point = float(out_scale), int(out_zero_point)
        self.register_buffer("weight_int8", weight_int8.to(torch.int8))
        self.register_buffer("weight_scales", weight_scales.float())
        self.register_buffer("bias", None if bias is None else bias.float())
        wq = torch._make_per_channel_quantized_tensor(self.weight_int8, self.weight_scales.double(),
                                                      torch.zeros_like(self.weight_scales, dtype=torch.long), 0)
        self._wq = wq
        self._packs: dict[tuple, object] = {}
        # fp32 output: oneDNN's pointwise ops where the layer runs on onednn; otherwise (x86/fbgemm/qnnpack have no
        # fp32-output int8 conv) the same sums in fp32 arithmetic on the dequantized int8 values
        self._onednn_fp32 = self.float_out and engine == "onednn" and hasattr(torch.ops.onednn, "qconv_pointwise")
        self._wzp = torch.zeros(self.weight_scales.shape, dtype=torch.long)
        self._packed = self._repack()
        if add:
            self._fn = torch.ops.quantized.conv2d_add_relu if act == "relu" else torch.ops.quantized.conv2d_add
        else:
            self._fn = _OPS[(kind, "relu" if act in ("relu", "relu6") else None)]

    @classmethod
    def from_float(cls, mod: nn.Module, out_scale: float | None, out_zero_point: int | None, engine: str):
        """``out_scale=None``: an fp32 output (no int8 op reads it)."""
        conv, act, add = _split(mod)
        kind = _kind(conv)
        # a fewer-bit weight of the QDQ graph is already on its grid; to_qdq marks the grid's largest int on the layer
        wq = quantize_weight(conv.weight, getattr(conv, "qcast_weight_qmax", 127))
        kw = {} if kind == "linear" else dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                              groups=conv.groups)
        float_out = out_scale is None
        if float_out:
            out_scale, out_zero_point = 1.0, 0
        clamp6 = not float_out and act == "relu6" and out_scale * (255 - out_zero_point) > 6.0 + out_scale
        return cls(kind, wq.int_repr(), wq.q_per_channel_scales(), conv.bias.detach() if conv.bias is not None else None,
                   out_scale=out_scale, out_zero_point=out_zero_point, act=act, add=add, clamp6=clamp6,
                   engine=engine, float_out=float_out, **kw)

    def forward(self, x, accum=None):
        if self.float_out:
            return self._forward_fp32(x, accum)
        if self.add:
            return self._conv_add(x, accum)
        y = self._fn(x, self._packed_for(x), self.out_scale, self.out_zero_point)
        if self.clamp6:
            y = torch.nn.functional.hardtanh(y, 0.0, 6.0)
        return y

    #: input shapes (per thread count) that get their own packed weight; later shapes share the first one
    MAX_PACKS = 4

    def _repack(self):
        if self._onednn_fp32:
            if self.kind == "linear":
                return torch.ops.onednn.qlinear_prepack(self.weight_int8, None)
            # the input params given here are not used by the kernel (it takes them on each call; measured exact
            # with other params than packed)
            return torch.ops.onednn.qconv_prepack(self.weight_int8, self.weight_scales, 1.0, 0, list(self.stride),
                                                  list(self.padding), list(self.dilation), self.groups, None)
        return _pack(self.kind, self._wq, self.bias, self.stride, self.padding, self.dilation, self.groups, self.engine)

    def _packed_for(self, x):
        """The packed weight for this input shape.

        PyTorch's oneDNN path caches its primitive in the packed weight, keyed on the *first* call's input
        shape (and thread count): every other shape rebuilds it on each call. Measured on MobileNetV2 at
        batch 1: 2.97 ms when batch 1 came first, 5.31 ms after a first call at batch 8 (e.g. an evaluation
        batch). So each input shape gets its own packed weight (packed on first use, up to ``MAX_PACKS``;
        each costs one copy of the int8 weight).
        """
        key = (*x.shape, torch.get_num_threads())
        packed = self._packs.get(key)
        if packed is None:
            if not self._packs:
                packed = self._packed  # the one packed at build time serves the first shape seen
            elif len(self._packs) < self.MAX_PACKS:
                packed = self._repack()
            else:
                return self._packed
            self._packs[key] = packed
        return packed

    def _forward_fp32(self, x, accum=None):
        """act(conv(x) [+ accum]) written as fp32: int8 input x int8 weight summed exactly (int32 / exact fp32
        accumulation), times the scales, plus the bias, then the fused post-ops; no requantization."""
        if not self._onednn_fp32 or x.dtype != torch.quint8 or (self.add and tuple(accum.shape) != self._out_shape(x.shape)):
            return self._fp32_reference(x, accum)
        xb, xs, xz = _bytes(x), x.q_scale(), x.q_zero_point()
        if self.kind == "linear":
            post, args = {"relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0])}.get(self.act, ("none", []))
            return torch.ops.onednn.qlinear_pointwise(xb, xs, xz, self._packed, self.weight_scales, self._wzp, self.bias,
                                                      1.0, 0, torch.float32, post, args, "")
        conv = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        if self.add:  # oneDNN's "sum" post-op into a fresh fp32 copy of the dequantized residual
            acc = accum.dequantize().contiguous(memory_format=torch.channels_last)
            y = torch.ops.onednn.qconv2d_pointwise.binary(xb, xs, xz, self._packed, self.weight_scales, self._wzp, acc,
                                                         self.bias, *conv, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0,
                                                         "relu" if self.act == "relu" else "none", [], "")
            return torch.clamp_(y, 0.0, 6.0) if self.act == "relu6" else y
        if self.kind == "conv3d" and self.act:  # oneDNN's fp32-output conv3d takes no post-op ("Unsupported post op")
            y = torch.ops.onednn.qconv_pointwise(xb, xs, xz, self._packed, self.weight_scales, self._wzp, self.bias,
                                                 *conv, 1.0, 0, torch.float32, "none", [], "")
            return y.clamp_(0.0, 6.0 if self.act == "relu6" else None)
        clamp = self.act == "relu6" and self.kind == "conv1d"  # oneDNN's conv1d has no hardtanh post-op: relu, then clamp
        post, args = {"relu": ("relu", []), "relu6": ("relu", []) if clamp else ("hardtanh", [0.0, 6.0])}.get(
            self.act, ("none", []))
        y = torch.ops.onednn.qconv_pointwise(xb, xs, xz, self._packed, self.weight_scales, self._wzp, self.bias,
                                             *conv, 1.0, 0, torch.float32, post, args, "")
        return y.clamp_(max=6.0) if clamp else y

    def _fp32_reference(self, x, accum=None):
        """The fp32-output layer in float arithmetic on the dequantized int8 input and weights (engines without an
        fp32-output int8 kernel, and a residual that broadcasts only at run time)."""
        w = self.weight_int8.float() * self.weight_scales.view(-1, *([1] * (self.weight_int8.dim() - 1)))
        xf = x.dequantize()
        if self.kind == "linear":
            y = torch.nn.functional.linear(xf, w, self.bias)
        else:
            y = _CONV_FN[self.kind](xf, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.add:
            y = y + accum.dequantize()
        if self.act == "relu":
            y = torch.relu(y)
        elif self.act == "relu6":
            y = torch.nn.functional.relu6(y)
        return y

    def _conv_add(self, x, accum):
        """act(conv(x) + accum) with ``quantized::conv2d_add[_relu]``, which writes into ``accum``'s buffer.

        ``clone_accum`` (set by ``ConvKernel.build`` when the graph still reads the accumulator) makes it
        work on a copy. Measured against oneDNN's ``qconv2d_pointwise`` "sum" post-op into a fresh buffer (never
        overwrites, no bookkeeping): that one ran ResNet-50 at batch 1 ~12% slower, as PyTorch caches the
        primitive only on this path (docs/design.md).
        """
        if tuple(accum.shape) != self._out_shape(x.shape):
            return self._conv_add_broadcast(x, accum)
        if self.clone_accum:
            accum = _copy(accum)
        # conv2d_add[_relu] dispatches on the global engine (not the packed weight): set it for this call only
        old = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.engine
        try:
            return self._fn(x, accum, self._packed_for(x), self.out_scale, self.out_zero_point)
        finally:
            torch.backends.quantized.engine = old

    def _conv_add_broadcast(self, x, accum):
        """An operand that matched the conv output at calibration but broadcasts now (e.g. calibrated at batch 1):
        the in-place kernel would write past the accumulator, so this call runs in float arithmetic."""
        w = self.weight_int8.float() * self.weight_scales.view(-1, *([1] * (self.weight_int8.dim() - 1)))
        y = torch.nn.functional.conv2d(x.dequantize(), w, self.bias, self.stride, self.padding, self.dilation,
                                       self.groups) + accum.dequantize()
        if self.act == "relu":
            y = torch.relu(y)
        return torch.quantize_per_tensor(y, self.out_scale, self.out_zero_point, torch.quint8)

    def input_mismatch(self, x, accum=None) -> str | None:
        """What is wrong with an input this layer cannot take (QuantizedModel's error names it), or None."""
        linear = self.kind == "linear"
        want_rank = {"conv1d": 3, "conv2d": 4, "conv3d": 5}.get(self.kind)
        if want_rank and x.dim() != want_rank:
            return f"expects a rank-{want_rank} input (batch, channels, ...), got rank {x.dim()} {list(x.shape)}"
        want = self.weight_int8.shape[1] * (1 if linear else self.groups)
        got = x.shape[-1] if linear else x.shape[1]
        if got != want:
            return (f"expects {want} input {'features (last dim)' if linear else 'channels (dim 1)'}, got {got} "
                    f"(its input is {list(x.shape)})")
        return None

    def _out_shape(self, shape) -> tuple[int, ...]:
        n, _, *spatial = shape
        out = [(i + 2 * p - d * (k - 1) - 1) // s + 1 for i, p, d, k, s in
               zip(spatial, self.padding, self.dilation, self.weight_int8.shape[2:], self.stride)]
        return (n, self.weight_int8.shape[0], *out)

    def spec(self):
        config = dict(kind=self.kind, stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation),
                      groups=self.groups, out_scale=self.out_scale, out_zero_point=self.out_zero_point, act=self.act,
                      add=self.add, clamp6=self.clamp6, engine=self.engine, clone_accum=self.clone_accum)
        if self.float_out:  # absent in files written before placement: they load with float_out=False
            config["float_out"] = True
        tensors = {"weight_int8": self.weight_int8, "weight_scales": self.weight_scales}
        if self.bias is not None:
            tensors["bias"] = self.bias
        return config, tensors

    def extra_repr(self):
        post = "+".join(p for p in (("add" if self.add else ""), self.act or "") if p)
        return (f"{self.kind}, out={tuple(self.weight_int8.shape)}, engine={self.engine}"
                + (f", fused={post}" if post else "")
                + (", fp32 out" if self.float_out else f", out_scale={self.out_scale:.4g}, zp={self.out_zero_point}"))


@register("conv1d", "conv2d", "conv3d", "linear", kind="compute", engines=("onednn", "x86", "fbgemm", "qnnpack"),
          notes="per-channel s8 weights, u8 activations; engine='auto' picks onednn, x86, fbgemm, qnnpack (ARM) in "
                "that order, the first that runs the layer; fused BN, relu/relu6; residual add(+relu) on onednn (conv2d)")
class ConvKernel(KernelImpl):
    @staticmethod
    def check(node: fx.Node, ctx) -> str | None:
        if node.op != "call_module":  # passes/functional_layers.py made a layer of every one it could
            fn = f"F.{ctx.op(node)}"
            why = node.meta.get("qcast_functional") or "its weight is not a parameter or buffer of the model"
            return f"{fn}: {why}"
        conv, act, add = _split(ctx.module(node))
        if isinstance(conv, CONVS) and conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r} has no int8 kernel (only 'zeros')"
        if isinstance(conv, CONVS) and isinstance(conv.padding, str):
            return f"padding={conv.padding!r} (string padding) has no int8 kernel; use explicit padding"
        reason = not_float_input(node, ctx)
        if reason:
            return reason
        meta = input_meta(node, ctx)
        want = {"conv2d": 4, "conv1d": 3, "conv3d": 5}.get(ctx.op(node))
        if want and len(meta.shape) != want:
            return f"{ctx.op(node)} on a rank-{len(meta.shape)} input has no int8 kernel (batched input expected)"
        if add and not isinstance(node.args[1], fx.Node):
            return "residual operand is not a tensor"
        return None

    @staticmethod
    def quant_inputs(node):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]

    @staticmethod
    def engine(node: fx.Node, ctx) -> str:
        """The engine this layer runs on: the config's, or the first of ``auto_order`` that accepts it."""
        wanted = ctx.setting(node, "engine")
        mod = ctx.module(node)
        _, _, add = _split(mod)
        candidates = auto_order() if wanted == "auto" else [wanted]
        if add:  # conv2d_add[_relu] only exists on onednn
            candidates = [e for e in candidates if e == "onednn"]
        shape = ctx.meta(node.args[0]).shape
        return first_engine(node, candidates, lambda eng: ConvKernel._try(mod, shape, eng),
                            "no int8 engine accepts this layer")

    @staticmethod
    def _try(mod, shape, engine):
        """Pack the layer for ``engine`` and check it on a seeded random input of the calibration shape (batch 1),
        with an int8 and an fp32 output, against the same int8 values computed in float: the engine must accept the
        layer *and* compute it right. Measured on an Intel Xeon with AMX (Sapphire Rapids), torch 2.13: oneDNN's int8
        conv2d with a (k, 1) kernel, k > 1, on few channels (4-16) returns wrong values (-5 to 8 dB against exact,
        both its quint8 and its fp32-output kernels, and the x86 engine's quint8 one), while fbgemm is exact and oneDNN
        is exact with AMX disabled (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI``). A layer an engine gets wrong goes to the
        next engine (``engine``), and ``explain()`` says why."""
        conv, act, add = _split(mod)
        g = torch.Generator().manual_seed(0)
        x = torch.quantize_per_tensor(torch.rand((1,) + tuple(shape[1:]), generator=g) * 2 - 1, 2 / 255, 128,
                                      torch.quint8)
        w = quantize_weight(conv.weight, getattr(conv, "qcast_weight_qmax", 127)).dequantize()
        with torch.no_grad():
            if isinstance(conv, nn.Linear):
                ref = torch.nn.functional.linear(x.dequantize(), w, conv.bias)
            else:
                ref = _CONV_FN[_kind(conv)](x.dequantize(), w, conv.bias, conv.stride, conv.padding, conv.dilation,
                                            conv.groups)
        span = float(ref.abs().max()) * (2 if add else 1) or 1.0
        scale, zp = 2 * span / 255, 128
        acc = None
        if add:
            acc = torch.quantize_per_tensor(torch.rand(ref.shape, generator=g) * span - span / 2, scale, zp,
                                            torch.quint8)
            ref = ref + acc.dequantize()
        if act in ("relu", "relu6"):
            ref = ref.clamp(0, 6 if act == "relu6" else None)
        # the fp32-output kernel too when a residual add is fused (the plan gives such a layer an fp32 output when no
        # int8 op reads it: oneDNN's "sum" post-op into the dequantized residual), each on its own copy of the
        # accumulator (the int8 kernel may write into it)
        outs = [QConv.from_float(mod, scale, zp, engine), QConv.from_float(mod, None, None, engine)]
        for q in outs:
            y = q(x, acc.clone()) if q.add else q(x)
            check_probe(ref, y.dequantize() if y.is_quantized else y, f"{'fp32' if q.float_out else 'int8'}-output")

    @staticmethod
    def reduce_range(engine: str) -> bool:
        return REDUCE_RANGE.get(engine, True)

    @staticmethod
    def float_output(node) -> bool:
        return True

    @staticmethod
    def build(node, ctx):
        if ctx.plan(node).float_out:  # no int8 op reads the output (plan.place_outputs): fp32 out, no requantize
            return QConv.from_float(ctx.module(node), None, None, ctx.plan(node).engine), tuple(node.args)
        qp = ctx.out_qparams(node)
        mod = QConv.from_float(ctx.module(node), qp.scale, qp.zero_point, ctx.plan(node).engine)
        if mod.add:
            mod.clone_accum = not _accum_dead_after(node, node.args[1])
        return mod, tuple(node.args)


def _accum_dead_after(node: fx.Node, other: fx.Node) -> bool:
    """Whether conv2d_add may overwrite the accumulator's int8 buffer: nothing reads it after ``node`` and
    ``node`` itself does not read it as its conv input.

    Aliases of the buffer: the QDQ point and the value it marks, and transitively the int8 passthrough ops
    it came through or feeds (a shape op may be a view, a relu_ works in place), and the QDQ points on them.
    When the conv's input is an alias (``relu(conv(y) + y)``) the kernel would overwrite the input it is
    still reading, so the accumulator is cloned rather than the add unfused: a clone is one copy of the
    output-sized tensor, while unfusing costs the conv writing its output plus a separate int8 add that
    reads two tensors, requantizes and writes a third.
    """
    order = {n: i for i, n in enumerate(node.graph.nodes)}

    def passthrough(n: fx.Node) -> bool:
        plan = n.meta.get("qcast_plan")
        return plan is not None and plan.precision == "int8" and plan.kind == "passthrough"

    aliases: set[fx.Node] = set()
    todo = [other]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in aliases:
            continue
        aliases.add(n)
        if "qcast_observes" in n.meta:
            todo.append(n.args[0])
        elif passthrough(n):
            todo.extend(n.meta["qcast_plan"].kernel.impl.quant_inputs(n))
        todo.extend(u for u in n.users if "qcast_observes" in u.meta or passthrough(u))
    if node.args[0] in aliases:
        return False
    for alias in aliases:
        if order[alias] > order[node]:
            return False
        for user in alias.users:
            if user is node or user in aliases:
                continue
            if order[user] > order[node] or user.op == "output":
                return False
    return True
