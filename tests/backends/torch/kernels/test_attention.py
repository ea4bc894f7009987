"""Transformer kernels (qcast/backends/torch/kernels/attention.py, qcast/backends/torch/kernels/transformer.py): matmul/bmm of two activations,
softmax, scaled_dot_product_attention, division by a number, layer_norm, unbind, 3-D linear, embedding, the
residual-stream rule, and gelu (float, with its measured reason).

The float model is the oracle. Thresholds sit ~3 dB under the SQNR measured with the suite's protocol (default
config, 8 calibration batches, held-out input, seed 0); the measured value is in the comment.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.ao.quantization import DeQuantStub, QuantStub

import qcast
from qcast.backends.torch.kernels.attention import QMatmul, QSoftmax
from qcast.backends.torch.kernels.conv import QConv
from qcast.backends.torch.kernels.elementwise import QScalar
from qcast.backends.torch.kernels.transformer import QEmbedding, QLayerNorm
from tests.helpers import assert_sqnr, sqnr
from tests.helpers import quantize_small as _quantize_small

# These tests pin the *static* int8 kernels (int8 edges between linears and the ops under test). The default
# activation="auto" runs linears on token sequences per-token dynamic with a float output (tests/backends/torch/kernels/test_dynamic.py),
# so the static scheme is asked for explicitly, merged into any config a test passes.
STATIC = {"activation": "int8"}


def quantize_small(model, make_input, *, config=None, **kw):
    return _quantize_small(model, make_input, config={**STATIC, **(config or {})}, **kw)
from tests.models.vit import Attention

SEQ = (2, 12, 32)


def _row(rows, name):
    return next(r for r in rows if r.name == name)


def _int8(rows, op):
    return [r for r in rows if r.op == op and r.precision == "int8"]


# ------------------------------------------------------------------------------------------------
# seed 002: the user's timm attention block, quantized in one call
# ------------------------------------------------------------------------------------------------
class Seed002(nn.Module):
    """timm ``Attention(dim=128, num_heads=8)`` between the QuantStub/DeQuantStub of the user's eager attempt."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.attn = Attention(128, num_heads=8)

    def forward(self, x):
        return self.dequant(self.attn(self.quant(x)))


def test_seed002_attention_block_runs_int8_end_to_end():
    torch.manual_seed(0)
    r = quantize_small(Seed002(), (1, 16, 128))
    rows = r.rows
    assert [x.name for x in _int8(rows, "linear")] == ["attn.qkv", "attn.proj"]
    assert [x.name for x in _int8(rows, "matmul")] == ["attn:matmul", "attn:matmul#2"]  # q @ k^T, attn @ v
    assert _row(rows, "attn:mul").precision == "int8"  # q * self.scale: params rescaled, no requantization
    assert _row(rows, "attn:softmax").precision == "int8"
    assert all(x.precision == "int8" for x in rows), [x for x in rows if x.precision != "int8"]
    kernels = [type(m) for m in r.qmodel.modules()]
    assert kernels.count(QMatmul) == 2 and kernels.count(QSoftmax) == 1
    # 33.2 dB; 33.7 with the attention (both matmuls, softmax) in float: int8 attention costs 0.5 dB
    assert_sqnr(r.sqnr, 30.0, "seed 002 attention block")


# ------------------------------------------------------------------------------------------------
# each op between int8 layers, against the float model
# ------------------------------------------------------------------------------------------------
class Between(nn.Module):
    """linear -> op -> linear on (batch, tokens, 32) inputs; ``fn(self, y)`` is the op under test."""

    def __init__(self, fn, width=32):
        super().__init__()
        self.a, self.b = nn.Linear(32, width), nn.Linear(32, width)
        self.ln = nn.LayerNorm(width)
        self.register_buffer("ln_w", torch.rand(width) + 0.5)
        self.register_buffer("ln_b", torch.randn(width) * 0.1)
        self.act = nn.GELU()
        self.head = nn.Linear(width, 8)
        self.fn = fn

    def forward(self, x):
        return self.head(self.fn(self, self.a(x)))


# id: (op under test, fn, kernel module class, threshold dB)   # measured SQNR (dB): int8 / op in float (skip)
OP_CASES = {
    "matmul": ("matmul", lambda s, y: torch.matmul(y, s.b(y).transpose(-2, -1)) @ y, QMatmul, 28.5),  # 31.4 / 32.1
    "bmm": ("bmm", lambda s, y: torch.bmm(torch.bmm(y, s.b(y).transpose(1, 2)), y), QMatmul, 28.5),  # 31.4
    # peaked scores amplify the error of their int8 inputs: 23.5 dB with the softmax and both matmuls in float too
    "softmax": ("softmax", lambda s, y: torch.softmax(y @ s.b(y).transpose(-2, -1) * 0.2, dim=-1) @ y, QSoftmax,
                20.5),  # 23.5 / 23.5
    "div_by_number": ("div", lambda s, y: y / 8.0, QScalar, 39.5),  # 42.6
    "layer_norm_module": ("layer_norm", lambda s, y: s.ln(y), QLayerNorm, 33.0),  # 36.3
    "layer_norm_functional": ("layer_norm", lambda s, y: F.layer_norm(y, (32,), s.ln_w, s.ln_b, 1e-6), QLayerNorm,
                              32.5),  # 35.7
}


def _run_op(name):
    _, fn, _, _ = OP_CASES[name]
    torch.manual_seed(0)
    return quantize_small(Between(fn), SEQ)


@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_runs_int8_between_int8_layers_and_matches_float(name):
    op, _, cls, threshold = OP_CASES[name]
    r = _run_op(name)
    rows = r.rows
    assert all(x.precision == "int8" for x in rows), [x for x in rows if x.precision != "int8"]
    assert _int8(rows, op), rows
    assert any(type(m) is cls for m in r.qmodel.modules()), f"no {cls.__name__} in the int8 model"
    assert_sqnr(r.sqnr, threshold, name)


def test_matmul_with_a_parameter_operand_runs_as_an_int8_linear():
    """``x @ self.w`` is a linear layer (passes/functional_layers.py): int8, named as captured, op ``linear``."""
    class ParamMatmul(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.w = nn.Linear(32, 32), nn.Parameter(torch.randn(32, 16))

        def forward(self, x):
            return self.a(x) @ self.w

    torch.manual_seed(0)
    r = quantize_small(ParamMatmul(), SEQ, batches=2)
    row = next(x for x in r.rows if x.name == "matmul")
    assert row.op == "linear" and row.precision == "int8" and "written as x @ weight" in row.reason, row


# ------------------------------------------------------------------------------------------------
# linear on 3-D input: int8, exact, calibrated
# ------------------------------------------------------------------------------------------------
def test_linear_on_3d_input_is_int8_exact_and_calibrated():
    torch.manual_seed(0)
    r = quantize_small(nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 8)), SEQ)
    assert [x.precision for x in r.rows] == ["int8", "int8"]
    ranges = {x.name for x in r.qmodel.qcast_meta["calibration_summary"].ranges}
    assert "0" in ranges  # the first linear's output params come from its own observer
    # the last one's output is the model's: nothing int8 reads it, so it writes fp32 and has no observer
    assert "1" not in ranges and r.qmodel.graph_module.get_submodule("1").float_out
    q = r.qmodel.graph_module.get_submodule("0")
    assert isinstance(q, QConv) and not q.float_out
    x = torch.quantize_per_tensor(torch.randn(3, 12, 32), 0.02, 128, torch.quint8)
    y3 = q(x).int_repr()
    y2 = q(x.reshape(36, 32)).int_repr().reshape(3, 12, 48)  # same rows through the 2-D path
    assert torch.equal(y3, y2)
    w = q.weight_int8.float() * q.weight_scales[:, None]
    ref = torch.quantize_per_tensor(F.linear(x.dequantize(), w, q.bias), q.out_scale, q.out_zero_point, torch.quint8)
    diff = (y3.int() - ref.int_repr().int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3  # int32 accumulation: ties only
    assert_sqnr(r.sqnr, 32.5, "two linears on (2, 12, 32)")  # 35.6


# ------------------------------------------------------------------------------------------------
# scaled_dot_product_attention (HF BERT's "sdpa" attention): decomposed, each value observed
# ------------------------------------------------------------------------------------------------
class SdpaBlock(nn.Module):
    """BERT-style self-attention calling F.scaled_dot_product_attention, with an optional mask argument."""

    def __init__(self, mode: str = "none", dim: int = 32, heads: int = 4):
        super().__init__()
        self.mode, self.heads = mode, heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, t):
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        if self.mode == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mode == "scale":
            y = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def _sdpa_input(mode):
    def make(g):
        x = torch.randn(2, 10, 32, generator=g)
        if mode == "float_mask":  # HF's extended mask: 0 where attended, a large negative number on padding
            keep = torch.ones(2, 1, 1, 10)
            keep[1, ..., 7:] = 0
            return x, (1.0 - keep) * torch.finfo(torch.float32).min
        if mode == "bool_mask":
            keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
            keep[1, ..., 7:] = False
            return x, keep
        return x
    return make


# mode: (softmax op, threshold dB)   # measured SQNR (dB): int8 / attention (scores, softmax, out) in float
SDPA_CASES = {
    "none": ("softmax", 24.0),  # 27.0 / 27.0
    "scale": ("softmax", 23.5),  # 26.5 / 26.5
    "float_mask": ("masked_softmax", 27.0),  # 29.8 / 29.9
    "bool_mask": ("masked_softmax", 27.0),  # 29.8 / 29.9
    "causal": ("masked_softmax", 28.5),  # 31.4 / 31.5
}


@pytest.mark.parametrize("mode", list(SDPA_CASES))
def test_sdpa_is_decomposed_into_int8_matmuls(mode):
    softmax_op, threshold = SDPA_CASES[mode]
    torch.manual_seed(0)
    r = quantize_small(SdpaBlock("none" if mode.endswith("mask") else mode), _sdpa_input(mode))
    rows = r.rows
    base = "scaled_dot_product_attention"
    assert [x.name for x in _int8(rows, "matmul")] == [f"{base}.scores", f"{base}.out"]
    assert _row(rows, f"{base}.q_scale").precision == "int8"
    softmax = _row(rows, f"{base}.softmax")
    assert softmax.op == softmax_op and softmax.precision == "int8", softmax
    assert all(x.precision == "int8" for x in rows), [x for x in rows if x.precision != "int8"]
    assert len(_int8(rows, "linear")) == 4
    # q, k, v, scores, probabilities and output each have their own calibrated params
    ranges = {x.name for x in r.qmodel.qcast_meta["calibration_summary"].ranges}
    assert {f"{base}.scores", f"{base}.softmax", f"{base}.out", "query", "key", "value"} <= ranges, ranges
    assert_sqnr(r.sqnr, threshold, f"sdpa {mode}")
    if mode == "float_mask":  # the padded keys get no attention in the int8 model either
        x, mask = r.x
        y = r.qmodel(x, mask)
        x2 = x.clone()
        x2[1, 7:] = torch.randn(3, 32)  # change only the padded tokens of sample 1
        y2 = r.qmodel(x2, mask)
        assert torch.equal(y[1, :7], y2[1, :7])


def test_sdpa_kept_in_float_by_skip_stays_whole():
    torch.manual_seed(0)
    r = quantize_small(SdpaBlock(), (2, 10, 32), config={"skip": ["scaled_dot_product_attention"]}, batches=2)
    row = next(x for x in r.rows if x.op == "scaled_dot_product_attention")
    assert row.precision == "float" and "skip" in row.reason
    assert not [x for x in r.rows if x.op == "matmul"]


# ------------------------------------------------------------------------------------------------
# the residual stream into a layer_norm stays float
# ------------------------------------------------------------------------------------------------
class TinyViT(nn.Module):
    """Patch tokens plus a class token whose values are ~50x smaller (as in the zoo's DeiT): pre-norm block, head
    on the class token."""

    def __init__(self, dim=32):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm1, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 64), nn.Linear(64, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = torch.cat((self.cls.expand(x.shape[0], -1, -1), self.embed(x)), dim=1)
        x = x + self.fc2(F.gelu(self.fc1(self.norm1(x))))
        return self.head(self.norm(x)[:, 0])


def test_residual_stream_into_layer_norm_stays_float():
    torch.manual_seed(0)
    r = quantize_small(TinyViT(), (2, 8, 16))
    rows = r.rows
    for name in ("cat", "add"):
        row = _row(rows, name)
        assert row.precision == "float" and "residual stream into" in row.reason, row
    assert "reads the residual stream (cat)" in _row(rows, "norm1").reason
    assert _row(rows, "norm1").precision == "float"
    assert [x.precision for x in rows if x.op == "linear"] == ["int8"] * 4
    assert_sqnr(r.sqnr, 33.5, "tiny ViT, class token")  # 36.7; 10.3 with the residual stream int8


# ------------------------------------------------------------------------------------------------
# embedding: int8 rows, float output
# ------------------------------------------------------------------------------------------------
class TinyEncoder(nn.Module):
    """BERT-like: token + position embeddings -> layer_norm -> attention (sdpa) -> layer_norm -> MLP -> pooled."""

    def __init__(self, vocab=200, dim=32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(16, dim)
        self.ln0, self.attn, self.ln1 = nn.LayerNorm(dim), SdpaBlock(), nn.LayerNorm(dim)
        self.fc1, self.fc2, self.ln2 = nn.Linear(dim, 64), nn.Linear(64, dim), nn.LayerNorm(dim)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.ln0(self.tok(ids) + self.pos(pos))
        h = self.ln1(h + self.attn(h))
        h = self.ln2(h + self.fc2(F.gelu(self.fc1(h) / 2.0)))
        return h.mean(1)


def _ids(g):
    return torch.randint(0, 200, (2, 12), generator=g)


def test_embedding_has_int8_rows_and_float_output():
    torch.manual_seed(0)
    r = quantize_small(TinyEncoder(), _ids)
    rows = r.rows
    for name in ("tok", "pos"):
        row = _row(rows, name)
        assert row.op == "embedding" and row.precision == "int8" and "8-bit rows, float output" in row.reason, row
    emb = r.qmodel.graph_module.get_submodule("tok")
    assert isinstance(emb, QEmbedding) and emb.weight_uint8.dtype == torch.uint8
    assert_sqnr(sqnr(r.model.tok.weight[r.x], emb(r.x)), 43.5, "looked-up rows")  # 46.8
    assert _row(rows, "add").precision == "float"  # the embedding sum feeds ln0: residual stream
    assert len(_int8(rows, "matmul")) == 2 and len(_int8(rows, "linear")) == 6
    div = _row(rows, "div")  # read only by the float gelu: int8 would be dequantized at once
    assert div.precision == "float" and "no int8 op reads its output" in div.reason, div
    gelu = _row(rows, "gelu")
    assert gelu.precision == "float" and "by measurement" in gelu.reason, gelu
    assert_sqnr(r.sqnr, 42.5, "tiny encoder")  # 45.7; 36.5 with the residual stream int8


def test_save_load_round_trip_of_transformer_kernels(tmp_path):
    torch.manual_seed(0)
    r = quantize_small(TinyEncoder(), _ids, batches=2)
    kinds = {type(m).__name__ for m in r.qmodel.modules()}
    assert {"QEmbedding", "QMatmul", "QSoftmax", "QScalar"} <= kinds, kinds  # QLayerNorm: the test below
    path = tmp_path / "enc.qcast"
    qcast.save(r.qmodel, path)
    loaded = qcast.load(path)
    assert qcast.explain(loaded) == r.rows
    with torch.no_grad():
        assert torch.equal(loaded(r.x), r.qmodel(r.x))
    float_bytes = sum(t.numel() * 4 for t in r.model.state_dict().values())
    assert path.stat().st_size < 0.45 * float_bytes  # int8 embedding tables and weights


def test_layer_norm_after_a_linear_is_int8_and_round_trips(tmp_path):
    r = _run_op("layer_norm_functional")
    path = tmp_path / "ln.qcast"
    qcast.save(r.qmodel, path)
    loaded = qcast.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(r.x), r.qmodel(r.x))
    ln = next(m for m in loaded.modules() if isinstance(m, QLayerNorm))
    assert torch.equal(ln.weight, r.model.ln_w) and torch.equal(ln.bias, r.model.ln_b)


@pytest.mark.parametrize("shape_a,shape_b", [((3, 4, 9, 32), (3, 4, 32, 9)), ((2, 197, 64), (2, 64, 197)),
                                             ((8, 12, 128, 128), (8, 12, 128, 32))])
def test_qmatmul_gives_the_exact_integer_products_and_restores_the_matmul_precision(shape_a, shape_b):
    """QMatmul runs the GEMM on bf16 units (oneDNN fp32_precision='bf16') on the centred integers: it must equal
    the float64 product of the dequantized operands, requantized, except for values on a rounding tie."""
    from qcast.backends.torch.kernels.attention import exact_int_matmul

    g = torch.Generator().manual_seed(0)
    a = torch.quantize_per_tensor(torch.randn(shape_a, generator=g) * 2, 0.021, 131, torch.quint8)
    b = torch.quantize_per_tensor(torch.rand(shape_b, generator=g), 1 / 255, 0, torch.quint8)  # probabilities
    ints = torch.matmul((a.int_repr().double() - 131), b.int_repr().double())
    assert ints.abs().max() < 2 ** 24  # every integer sum is representable in fp32
    out_scale, out_zp = 0.013, 127
    want = torch.clamp(torch.round(ints * (a.q_scale() * b.q_scale()) / out_scale) + out_zp, 0, 255)
    before = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    got = QMatmul(out_scale, out_zp)(a, b).int_repr().double()
    assert getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None) == before
    assert (got - want).abs().max() <= 1  # a tie may round either way after the fp32 rescale
    assert (got != want).double().mean() < 1e-3
    with exact_int_matmul():  # the centred integers multiply exactly under the bf16 setting
        exact = torch.matmul(a.int_repr().float() - 131, b.int_repr().float())
    assert torch.equal(exact.double(), ints)


def test_exact_int_matmul_restores_the_setting_when_threads_overlap():
    """Alone (the main thread, no other thread alive) the exact integer matmul runs oneDNN's fp32 matmuls on bf16
    and restores the setting after. Two threads inside at once (a server running the model concurrently): the
    process-wide bf16 setting would also move the other threads' float matmuls (tests/test_concurrency.py), so neither
    switches it (plain fp32, still exact) and it is unchanged after, whatever the order they leave in."""
    import threading

    from qcast.backends.torch.kernels.attention import exact_int_matmul

    prec = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if getattr(prec, "fp32_precision", None) is None:
        pytest.skip("this PyTorch has no oneDNN fp32_precision setting (QMatmul then runs plain fp32)")
    before = prec.fp32_precision
    from qcast.backends.torch.kernels.attention import _alone

    expected = "bf16" if _alone() else before  # a thread an earlier test left running counts as another thread
    with exact_int_matmul():
        inside = prec.fp32_precision
    assert inside == expected and prec.fp32_precision == before
    in0, in1, left0 = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first():  # in first, out first
        with exact_int_matmul():
            in0.set()
            in1.wait(30)
            seen.append(prec.fp32_precision)
        left0.set()

    def second():  # in second, out last
        in0.wait(30)
        with exact_int_matmul():
            in1.set()
            left0.wait(30)
            seen.append(prec.fp32_precision)
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == [before, before]
    assert prec.fp32_precision == before
