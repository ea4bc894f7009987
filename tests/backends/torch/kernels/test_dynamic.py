"""Per-token dynamic int8 linear (qcast/backends/torch/kernels/dynamic.py): QuantConfig(activation="dynamic")."""
import pytest
import torch
import torch.nn as nn

import qcast
from qcast.errors import ConfigError
from qcast.backends.torch.kernels.dynamic import QLinearDynamic
from tests.helpers import sqnr


def _tokens_with_outlier_rows(n=64, dim=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, dim, generator=g)
    x[:, ::16] *= 30.0  # a few tokens 30x larger than the rest (BERT's [SEP]-like outlier tokens)
    return x


class MLP(nn.Module):
    def __init__(self, dim=48):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_kernel_matches_float_linear_per_token():
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    x = _tokens_with_outlier_rows()
    q = QLinearDynamic.from_float(lin)
    out, ref = q(x), lin(x)
    assert out.shape == ref.shape
    # every token keeps its own resolution: the small tokens are as accurate as the large ones
    small = [i for i in range(x.shape[1]) if i % 16]
    assert sqnr(ref[:, small], out[:, small]) > 35 and sqnr(ref, out) > 35


def test_dynamic_beats_static_on_outlier_tokens_and_explains_itself():
    torch.manual_seed(0)
    model = MLP().eval()
    calib = [_tokens_with_outlier_rows(seed=i) for i in range(4)]
    x = _tokens_with_outlier_rows(seed=9)
    static = qcast.quantize(model, calib, config=qcast.QuantConfig(activation="int8"), progress=False)
    dynamic = qcast.quantize(model, calib, config=qcast.QuantConfig(activation="dynamic"), progress=False)
    with torch.no_grad():
        ref = model(x)
        s_static, s_dynamic = sqnr(ref, static(x)), sqnr(ref, dynamic(x))
    assert s_dynamic > s_static + 6, (s_static, s_dynamic)
    rows = {r.name: r for r in qcast.explain(dynamic)}
    assert rows["fc1"].precision == "int8" and "per-token dynamic" in rows["fc1"].reason
    assert rows["fc1"].reason.endswith("fused relu")  # relu runs inside the dynamic kernel


def test_per_layer_dynamic_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    calib = [_tokens_with_outlier_rows(seed=i) for i in range(2)]
    cfg = qcast.QuantConfig(activation="int8", per_layer={"fc2": {"activation": "dynamic"}})
    q = qcast.quantize(model, calib, config=cfg, progress=False)
    rows = {r.name: r for r in qcast.explain(q)}
    assert "per-token dynamic" in rows["fc2"].reason and "per-token dynamic" not in rows["fc1"].reason
    qcast.save(q, tmp_path / "m.qcast")
    x = _tokens_with_outlier_rows(seed=5)
    assert torch.equal(q(x), qcast.load(tmp_path / "m.qcast")(x))


def test_auto_is_per_token_on_token_sequences_only():
    """The default activation="auto": a linear on (batch, tokens, features) is per-token dynamic, on (batch,
    features) it stays static int8."""
    torch.manual_seed(0)
    model = MLP().eval()
    seq = qcast.quantize(model, [_tokens_with_outlier_rows(seed=0)], progress=False)
    flat = qcast.quantize(model, [_tokens_with_outlier_rows(seed=0)[0]], progress=False)
    assert all("per-token dynamic" in r.reason for r in qcast.explain(seq))
    assert not any("per-token dynamic" in r.reason for r in qcast.explain(flat))


def test_unknown_activation_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="activation"):
        qcast.QuantConfig(activation="per_token")


def test_smoothquant_scales_inside_the_kernel_equal_a_separate_multiply():
    """A Smooth before a per-token linear is folded into it at convert (``input_scale``): the same numbers as
    multiplying first, and the caller's tensor is left untouched although the kernel works in place."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 10)
    inv_s = torch.rand(24) + 0.25
    plain = QLinearDynamic.from_float(lin)
    config, tensors = plain.spec()
    owned = QLinearDynamic.from_spec(config, {**tensors, "input_scale": inv_s})
    x = torch.randn(3, 7, 24) * 4
    before = x.clone()
    assert torch.equal(owned(x), plain(x * inv_s))
    assert torch.equal(x, before)
    assert owned.owned_smooth and "SmoothQuant" in repr(owned)


class _QKV(nn.Module):
    """Three per-token linears reading one tensor (a transformer's query/key/value), one with no bias."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8, bias=False), nn.Linear(16, 12)

    def forward(self, x):
        h = self.norm(x)
        return self.q(h) + self.k(h), self.v(h)


def test_linears_reading_one_tensor_share_one_gemm_with_the_same_numbers(tmp_path, monkeypatch):
    import sys

    torch.manual_seed(0)
    model = _QKV().eval()
    calib = [torch.randn(2, 5, 16) for _ in range(3)]
    x = torch.randn(3, 7, 16)
    stacked = qcast.quantize(model, calib, progress=False)
    stacks = [m for m in stacked.modules() if isinstance(m, QLinearDynamic) and m.splits]
    assert len(stacks) == 1 and stacks[0].splits == [8, 8, 12]
    monkeypatch.setattr(sys.modules["qcast.backends.torch.lower"], "fuse_siblings", lambda graph, root: 0)
    separate = qcast.quantize(model, calib, progress=False)
    assert not any(isinstance(m, QLinearDynamic) and m.splits for m in separate.modules())
    with torch.no_grad():
        for a, b in zip(stacked(x), separate(x)):
            assert torch.equal(a, b)  # int32 accumulation per output column does not depend on the stacking
    assert [r for r in qcast.explain(stacked)] == [r for r in qcast.explain(separate)]
    qcast.save(stacked, tmp_path / "s.qcast")
    loaded = qcast.load(tmp_path / "s.qcast")
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(stacked(x), loaded(x)))
    rows = {r.name: r for r in qcast.compare(model, stacked, x).layers}
    assert all(rows[n].sqnr > 30 for n in ("q", "k", "v")), {n: rows[n].sqnr for n in ("q", "k", "v")}


def test_kernel_equals_an_explicit_per_row_u8_quantization():
    """The reference: each row quantized by itself to 256 levels over its own [min, max], multiplied by the int8
    weight in exact integer arithmetic (float64), and mapped back. Equal up to fp32 rounding, except that a row's
    min and max sit exactly on rounding ties (+-127.5 levels) and may take either neighbour in fp32."""
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    q = QLinearDynamic.from_float(lin)
    x = _tokens_with_outlier_rows(n=16, dim=40).double()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    mid, width = (lo + hi) / 2, hi - lo
    levels = torch.clamp(torch.round((x - mid) / width * 255) + 128, 0, 255) - 128  # integers in [-128, 127]
    w_int = q.weight_int8.double()
    acc = levels @ w_int.T  # exact integer sums
    ref = acc * (width / 255) * q.weight_scale.double() + mid * (w_int.sum(1) * q.weight_scale.double()) \
        + lin.bias.detach().double()
    out = q(x.float()).double()
    w_deq = w_int * q.weight_scale.double()[:, None]
    tie = (width / 255) * (w_deq.T[x.argmax(-1)].abs() + w_deq.T[x.argmin(-1)].abs())  # one level at min and max
    slack = 1e-5 * ref.abs().amax(-1, keepdim=True)  # fp32 rounding of the rescale
    assert ((out - ref).abs() <= tie + slack).all()
