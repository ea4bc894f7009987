"""Attention: matmul / bmm of two activations, softmax, and ``F.scaled_dot_product_attention`` decomposed into them.

**matmul / bmm** (``q @ k.transpose(-2, -1)``, ``attn @ v``): both operands int8 with their own calibrated
per-tensor params, the result requantized to calibrated output params. The kernel computes the product of the
dequantized operands in fp32 and quantizes it (``QMatmul``): PyTorch has no int8 batched matmul on CPU;
``quantized::matmul`` does the same dequantize/fp32/quantize internally. Candidates measured (see
``QMatmul``) were no faster; the int8 edge still saves the float round trip of a separate quantize and dequantize.

**softmax**: int8 in, int8 out (``quantized::softmax``, bit-exact against dequantize -> softmax -> quantize),
output params calibrated on the probabilities.

**scaled_dot_product_attention** is rewritten at prepare time (``qcast/passes/decompose_sdpa.py``, a backend-free
pass called by ``prepare.transform``) into ``q * scale`` (int8 values unchanged, params rescaled), ``k.transpose(-2, -1)``,
``matmul`` (the scores), ``softmax`` -- ``masked_softmax`` with an ``attn_mask`` (a float mask is added, a bool mask
keeps its True positions) or ``is_causal``: the mask is applied in float to the dequantized scores, as it holds
values int8 cannot represent -- and ``matmul`` (the output). Every intermediate value is then an ordinary node with
its own observer, so calibration, ``compare()``, sensitivity and save/load see q, k, v, the scores, the
probabilities and the output like any other op, named ``<sdpa call>.scores`` / ``.softmax`` / ``.out``.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.fx as fx
import torch.nn.functional as F

from .base import KernelImpl, KernelModule, kernel_module, not_float_input
from ....nn import masked_softmax
from .registry import register


def _name(n: fx.Node) -> str:
    return n.meta.get("qcast_name", n.name)


# -------------------------------------------------------------------------------------------------
# matmul / bmm of two activations
# -------------------------------------------------------------------------------------------------
def _centred(q: torch.Tensor) -> torch.Tensor:
    """The integers ``q_int - zero_point`` of a per-tensor quantized tensor, in fp32 to within a rounding of the
    scale (bf16, or any conversion to nearest, gives the integers exactly). ``dequantize() * (1 / scale)`` is
    ~6x faster than ``int_repr().float() - zero_point`` (measured: int_repr is not vectorized for quint8)."""
    return q.dequantize().mul_(1.0 / q.q_scale())


_BF16 = {"lock": threading.Lock(), "users": 0, "saved": None}


@contextlib.contextmanager
def exact_int_matmul():
    """Let oneDNN run fp32 matmuls on bf16 units (fp32 accumulation) while inside: only for operands that are
    integers of magnitude <= 256, which bf16 holds exactly, so the products are unchanged (an s8/u8 GEMM's
    integer sums, exact below 2^24). The setting is process-wide: the first caller in saves it and the last one out
    restores it, so calls from several threads at once cannot leave it changed (docs/design.md, known limits)."""
    prec = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if getattr(prec, "fp32_precision", None) is None:  # a PyTorch without the setting: plain fp32, still exact
        yield
        return
    with _BF16["lock"]:
        if _BF16["users"] == 0:
            _BF16["saved"] = prec.fp32_precision
            prec.fp32_precision = "bf16"
        _BF16["users"] += 1
    try:
        yield
    finally:
        with _BF16["lock"]:
            _BF16["users"] -= 1
            if _BF16["users"] == 0:
                prec.fp32_precision = _BF16["saved"]


@kernel_module
class QMatmul(KernelModule):
    """Product of two quantized tensors (``torch.matmul`` broadcasting), requantized to calibrated output params.

    Computed as ``quantize(matmul(dequantize(a), dequantize(b)))``: exact up to fp32 rounding of the sums (an
    int8 product is an integer below 2^16 times ``scale_a * scale_b``), i.e. what an integer kernel would give,
    rounding ties aside. Measured against the alternatives on this machine (torch 2.13, one thread, medians of
    21 rounds, microseconds; DeiT-tiny scores 3x197x64x197, attn @ v 3x197x197x64, BERT-base scores
    12x128x64x128, a batch of 8 x 12 heads 96x128x32x128):

    ======================================  ======  =======  =======  ========
    kernel                                  scores  attn@v   BERT     8x12
    ======================================  ======  =======  =======  ========
    fp32 matmul (the float model's op)      ~570    ~590     ~710     ~4500
    dequantize + fp32 matmul + quantize     ~650    ~230     ~780     ~4760
    ``quantized::matmul``                   ~650    ~420     ~1190    ~5000
    int-valued fp32 matmul + quantize       ~740    ~940     ~1340    ~7270
    ``torch._int_mm`` per head + zp terms   ~630    ~320     ~1210    ~8290
    ======================================  ======  =======  =======  ========

    (a machine shared with other jobs: only differences above ~30% are meaningful). ``_int_mm`` is 2-D only,
    so it loops over batch x heads in Python and needs zero-point correction terms; it wins only with few heads.
    """

    def __init__(self, out_scale: float, out_zero_point: int, float_out: bool = False):
        super().__init__()
        self.out_scale, self.out_zero_point = float(out_scale), int(out_zero_point)
        self.float_out = bool(float_out)  # no int8 op reads the product: left in fp32

    def forward(self, a, b):
        # integer operands (q - zp, |value| <= 255) are exact in bf16, so the GEMM may run on bf16 units with fp32
        # accumulation and still give the exact integer sums (below 2^24) that an s8/u8 kernel would
        with exact_int_matmul():
            y = torch.matmul(_centred(a), _centred(b))
        y = y.mul_(a.q_scale() * b.q_scale())
        if self.float_out:
            return y
        return torch.quantize_per_tensor(y, self.out_scale, self.out_zero_point, torch.quint8)

    def spec(self):
        config = dict(out_scale=self.out_scale, out_zero_point=self.out_zero_point)
        if self.float_out:  # absent in files written before placement
            config["float_out"] = True
        return config, {}

    def extra_repr(self):
        return "fp32 out" if self.float_out else f"out_scale={self.out_scale:.4g}, zp={self.out_zero_point}"


@register("matmul", "bmm", kind="compute", engines=("native",),
          notes="two int8 activations (per-tensor params each), product requantized to calibrated output params")
class MatmulKernel(KernelImpl):
    # a GEMM is worth quantizing its float inputs for (e.g. q/k/v from per-token dynamic linears, which output float)
    needs_int8_input = False

    @staticmethod
    def check(node, ctx):
        op = ctx.op(node)
        if node.kwargs or len(node.args) != 2:
            return f"{op} with keyword arguments or {len(node.args)} arguments has no int8 kernel"
        metas = []
        for x in node.args:
            if not isinstance(x, fx.Node):
                return f"operand {x!r} is not a tensor"
            if x.op == "get_attr":  # passes/functional_layers.py made a linear of every ``x @ W`` it could
                why = node.meta.get("qcast_functional") or "a parameter/buffer as the first operand (W @ x) is not a linear layer"
                return f"operand '{x.target}' is a parameter/buffer: {why}; it runs in float"
            meta = ctx.meta(x)
            if meta is None or not meta.is_float:
                return f"operand {_name(x)} is not a floating-point tensor"
            metas.append(meta)
        ranks = [len(m.shape) for m in metas]
        if min(ranks) < 2:
            return f"{op} of rank {ranks} operands (a vector operand) has no int8 kernel; both need rank >= 2"
        return None

    @staticmethod
    def quant_inputs(node):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]

    @staticmethod
    def float_output(node) -> bool:
        return True

    @staticmethod
    def build(node, ctx):
        if ctx.plan(node).float_out:
            return QMatmul(1.0, 0, float_out=True), tuple(node.args[:2])
        qp = ctx.out_qparams(node)
        return QMatmul(qp.scale, qp.zero_point), tuple(node.args[:2])


# -------------------------------------------------------------------------------------------------
# softmax
# -------------------------------------------------------------------------------------------------
def _softmax_dim(node: fx.Node, ctx):
    if node.op == "call_module":
        return getattr(ctx.module(node), "dim", None)
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)


@kernel_module
class QSoftmax(KernelModule):
    """quantized::softmax along ``dim``, requantized to calibrated output params."""

    def __init__(self, dim: int, out_scale: float, out_zero_point: int):
        super().__init__()
        self.dim, self.out_scale, self.out_zero_point = int(dim), float(out_scale), int(out_zero_point)

    def forward(self, x):
        return torch.ops.quantized.softmax(x, self.dim, self.out_scale, self.out_zero_point)

    def spec(self):
        return dict(dim=self.dim, out_scale=self.out_scale, out_zero_point=self.out_zero_point), {}

    def extra_repr(self):
        return f"dim={self.dim}, out_scale={self.out_scale:.4g}, zp={self.out_zero_point}"


@register("softmax", kind="compute", engines=("native",),
          notes="quantized::softmax, probabilities requantized to calibrated output params")
class SoftmaxKernel(KernelImpl):
    needs_int8_input = True

    @staticmethod
    def check(node, ctx):
        if node.op != "call_module":
            pos = 3 if node.target is F.softmax else 2  # F.softmax(input, dim, _stacklevel, dtype)
            dtype = node.kwargs.get("dtype", node.args[pos] if len(node.args) > pos else None)
            if dtype is not None:
                return "softmax with a dtype argument has no int8 kernel"
        dim = _softmax_dim(node, ctx)
        if not isinstance(dim, int):
            return "softmax without an explicit integer dim has no int8 kernel"
        return not_float_input(node, ctx)

    @staticmethod
    def build(node, ctx):
        qp = ctx.out_qparams(node)
        rank = len(ctx.meta(node.args[0]).shape)
        return QSoftmax(_softmax_dim(node, ctx) % rank, qp.scale, qp.zero_point), (node.args[0],)


# -------------------------------------------------------------------------------------------------
# scaled_dot_product_attention -> its ops
# -------------------------------------------------------------------------------------------------
@kernel_module
class QMaskedSoftmax(KernelModule):
    """The masked softmax of a decomposed ``scaled_dot_product_attention`` on int8 scores: the mask (float, with
    large negative or ``-inf`` values that int8 cannot represent) is applied to the dequantized scores, and the
    probabilities are requantized to calibrated output params."""

    def __init__(self, causal: bool, out_scale: float, out_zero_point: int):
        super().__init__()
        self.causal, self.out_scale, self.out_zero_point = bool(causal), float(out_scale), int(out_zero_point)

    def forward(self, scores, mask=None):
        y = masked_softmax(scores.dequantize(), mask, self.causal, inplace=True)
        return torch.quantize_per_tensor(y, self.out_scale, self.out_zero_point, torch.quint8)

    def spec(self):
        return dict(causal=self.causal, out_scale=self.out_scale, out_zero_point=self.out_zero_point), {}

    def extra_repr(self):
        return f"{'causal' if self.causal else 'mask'}, out_scale={self.out_scale:.4g}, zp={self.out_zero_point}"


@register("masked_softmax", kind="compute", engines=("native",),
          notes="sdpa's softmax with its mask: int8 scores in, mask applied in float, probabilities requantized")
class MaskedSoftmaxKernel(KernelImpl):
    needs_int8_input = True

    @staticmethod
    def check(node, ctx):
        return not_float_input(node, ctx)

    @staticmethod
    def note(node, ctx):
        return "the mask is applied in float to the dequantized scores (it holds values int8 cannot represent)"

    @staticmethod
    def build(node, ctx):
        qp = ctx.out_qparams(node)
        scores, mask, causal = (list(node.args) + [None, False])[:3]
        return QMaskedSoftmax(bool(causal), qp.scale, qp.zero_point), (scores, mask)
