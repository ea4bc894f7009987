"""SmoothQuant (qcast.passes.smooth + qcast.smooth, QuantConfig(smoothquant=alpha)): same float function, outlier
channels moved into the weights, output SQNR gained on a block with an outlier channel, linears without outliers left
alone, the user's model untouched, config validation, save/load, compare."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcast
from qcast.errors import ConfigError, NotCalibratedError
from qcast.smooth import Smooth, outlier_ratio, smooth_scales
from tests.helpers import sqnr

D, HEADS, FF = 64, 4, 128


class PostLNBlock(nn.Module):
    """A BERT-style post-LN encoder block and a head. ``outlier``: LayerNorm weight of one channel (ln1: 3, ln2: 7)
    multiplied by it, and the weight column of the linear reading that channel (fc1, head) divided by it: the same
    function as without, but the LayerNorm outputs (which also feed the residual adds, so 1/s cannot be folded into
    the LayerNorm) carry an outlier channel, as trained transformers do."""

    def __init__(self, outlier: float = 30.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)
        self.head = nn.Linear(D, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.02)
            if outlier:
                self.ln1.weight[3] *= outlier
                self.fc1.weight[:, 3] /= outlier
                self.ln2.weight[7] *= outlier
                self.head.weight[:, 7] /= outlier
        self.eval()

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (y.reshape(b, t, HEADS, -1).transpose(1, 2) for y in self.qkv(x).chunk(3, dim=-1))
        a = torch.softmax(q @ k.transpose(-2, -1) / (d // HEADS) ** 0.5, dim=-1) @ v
        x = self.ln1(x + self.proj(a.transpose(1, 2).reshape(b, t, d)))
        x = self.ln2(x + self.fc2(F.gelu(self.fc1(x))))
        return self.head(x)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, D, generator=g) for _ in range(8)], torch.randn(4, 16, D, generator=g)


def _quantize(model, alpha, activation="int8", **kw):
    calib, _ = _data()
    return qcast.quantize(model, calib, config=qcast.QuantConfig(smoothquant=alpha, activation=activation, **kw),
                          progress=False)


def _smooth_rows(qmodel):
    return [r for r in qcast.explain(qmodel) if r.op == "smooth"]


def test_scales_follow_the_formula():
    absmax = torch.tensor([1.0, 4.0, 0.0])
    w = torch.tensor([[0.5, -2.0, 1.0], [0.25, 1.0, -0.5]])
    s = smooth_scales(absmax, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([(1.0 / 0.5) ** 0.5, (4.0 / 2.0) ** 0.5], dtype=torch.float64))
    assert 0 < float(s[2]) < 1e-2  # a dead channel gets a small (clamped) scale, not 0
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 30.0])) == pytest.approx(30.0)


def test_smoothed_graph_computes_the_same_float_function():
    model = PostLNBlock()
    calib, x = _data()
    observed = qcast.prepare(model, calib[0], qcast.QuantConfig(smoothquant=0.7, activation="int8"))
    with torch.no_grad():
        before = observed(x)  # Smooth nodes are identities until calibrated
    qcast.calibrate(observed, calib, progress=False)
    smooths = {m.layer: m for m in observed.gm.modules() if isinstance(m, Smooth)}
    assert set(smooths) == {"fc1", "head"}  # the linears reading the outlier channel; the others left alone
    assert all(m.resolved and float(m.inv_s.max() / m.inv_s.min()) > 5 for m in smooths.values())
    with torch.no_grad():  # observers are identities in the forward pass: this is the float graph
        ref, after = model(x), observed(x)
    assert torch.allclose(before, ref, atol=1e-5)
    assert torch.allclose(after, ref, rtol=1e-4, atol=1e-4), float((after - ref).abs().max())
    rows = {r["layer"]: r for r in observed.gm.meta["qcast_smoothquant"].summary()["layers"]}
    assert rows["fc1"]["smoothed"] and rows["fc1"]["ratio"] > 20
    assert not rows["fc2"]["smoothed"] and "no outlier channel" in rows["fc2"]["reason"]


@pytest.mark.parametrize("activation, floor", [
    ("int8", 32.0),  # static int8 linears: 15.90 -> 35.18 dB measured
    ("auto", 32.3),  # per-token dynamic linears (the default on token sequences): 30.74 -> 35.30 dB
])
def test_smoothing_raises_output_sqnr_on_an_outlier_channel(activation, floor):
    """Thresholds: 3 dB under the measured smoothed SQNR, and a gain of at least 1.5 dB (a third of the smaller
    measured gain, +4.6 dB: the unsmoothed figure moves with the other kernels)."""
    model = PostLNBlock(seed=1)
    _, x = _data()
    with torch.no_grad():
        ref = model(x)
        plain = sqnr(ref, _quantize(model, None, activation)(x))
        smoothed_q = _quantize(model, "auto", activation)  # the default: alpha 0.5 on token-sequence linears
        smoothed = sqnr(ref, smoothed_q(x))
    assert smoothed >= floor and smoothed - plain >= 1.5, f"{activation}: {plain:.2f} -> {smoothed:.2f} dB"
    assert {r.name for r in _smooth_rows(smoothed_q)} == {"fc1:smooth", "head:smooth"}
    assert all(r.precision == "float" and "SmoothQuant: per-channel scale moved into the weights of" in r.reason
               for r in _smooth_rows(smoothed_q))
    assert smoothed_q.qcast_meta["smoothquant"]["smoothed"] == 2


def test_auto_smooths_token_sequences_only():
    """``"auto"`` leaves a linear on a 2-D input (a CNN's classifier head) alone; an explicit alpha smooths it."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 10)).eval()
    with torch.no_grad():
        head[0].weight[5] = 30.0
    calib = [torch.randn(4, D) for _ in range(4)]
    for alpha, rows in (("auto", []), (0.5, ["1:smooth"])):
        q = qcast.quantize(head, calib, config=qcast.QuantConfig(smoothquant=alpha), progress=False)
        assert [r.name for r in _smooth_rows(q)] == rows, alpha


def test_no_outlier_channel_leaves_the_model_as_without_smoothquant():
    """Every Smooth is dropped before the normal pass (the observers re-anchored or removed): same int8 model."""
    model = PostLNBlock(outlier=0.0)
    _, x = _data()
    q_off, q_on = _quantize(model, None), _quantize(model, 0.7)
    assert not _smooth_rows(q_on) and q_on.qcast_meta["smoothquant"]["smoothed"] == 0
    assert q_on.qcast_meta["smoothquant"]["left_alone"] == 5  # qkv, proj, fc1, fc2, head
    with torch.no_grad():
        assert torch.equal(q_off(x), q_on(x))


def test_users_model_is_untouched():
    model = PostLNBlock()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _quantize(model, 0.7)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, Smooth) for m in model.modules())


def test_per_layer_override_and_tied_or_shared_linears():
    model = PostLNBlock()
    q = _quantize(model, None, per_layer={"head": {"smoothquant": 0.5}})
    assert [r.name for r in _smooth_rows(q)] == ["head:smooth"]

    class Shared(nn.Module):  # one linear called twice: its columns cannot be rescaled per call site
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(D)
            self.fc = nn.Linear(D, D)
            with torch.no_grad():
                self.ln.weight[0] = 30.0

        def forward(self, x):
            return self.fc(self.ln(x)) + self.fc(x)

    q = _quantize(Shared().eval(), 0.7)
    assert not _smooth_rows(q) and "smoothquant" not in q.qcast_meta


def test_config_validation():
    assert qcast.QuantConfig().smoothquant == "auto"
    assert qcast.QuantConfig(smoothquant=False).smoothquant is None
    assert qcast.QuantConfig(smoothquant=0.7) == qcast.QuantConfig.from_json(qcast.QuantConfig(smoothquant=0.7).to_json())
    for bad in (0, 1, 1.5, -0.2, True, "0.7", "Auto"):
        with pytest.raises(ConfigError, match="smoothquant.*alpha in \\(0, 1\\)"):
            qcast.QuantConfig(smoothquant=bad)
    with pytest.raises(ConfigError, match=r"per_layer\['fc1'\].smoothquant"):
        qcast.QuantConfig(per_layer={"fc1": {"smoothquant": 2}})


def test_convert_without_calibrate_names_the_fix():
    model = PostLNBlock()
    calib, _ = _data()
    observed = qcast.prepare(model, calib[0], qcast.QuantConfig(smoothquant=0.7, activation="int8",
                                                                 bias_correction=False))
    with torch.no_grad():
        for c in calib:
            observed(c)  # observers fed directly: the scales were never chosen
    with pytest.raises(NotCalibratedError, match="smoothquant.*qcast.calibrate"):
        qcast.convert(observed)


@pytest.mark.parametrize("activation", ["int8", "auto"])
def test_save_load_and_compare(tmp_path, activation):
    """Static int8 linears keep a float Smooth module before them; per-token dynamic ones ("auto" on token
    sequences) apply the scales inside their kernel, and compare() still finds them."""
    from qcast.backends.torch.kernels.dynamic import QLinearDynamic

    model = PostLNBlock()
    q = _quantize(model, 0.7, activation)
    _, x = _data()
    path = tmp_path / "smooth.qcast"
    qcast.save(q, path)
    loaded = qcast.load(path)
    with torch.no_grad():
        assert torch.equal(q(x), loaded(x))
    smooths = {m.layer for m in loaded.modules() if isinstance(m, Smooth)}
    owned = {p for p, m in loaded.graph_module.named_modules() if isinstance(m, QLinearDynamic) and m.owned_smooth}
    assert (smooths, owned) == (({"fc1", "head"}, set()) if activation == "int8" else (set(), {"fc1", "head"}))
    assert loaded.qcast_meta["smoothquant"]["smoothed"] == 2
    report = qcast.compare(model, q, x)
    rows = {r.name: r for r in report.layers}
    # the float graph gets the same scales, so the head's isolated SQNR compares like with like
    # (measured 38.9 dB; 1.8 dB when the float graph keeps the unsmoothed input)
    assert rows["head"].sqnr_isolated is not None and rows["head"].sqnr_isolated > 30.0
    if activation == "int8":
        assert rows["head:smooth"].precision == "float"
    else:  # no separate tensor to compare (like a relu fused into its conv); explain() still has the row
        assert "head:smooth" not in rows
        assert next(r for r in qcast.explain(q) if r.name == "head:smooth").precision == "float"


def test_linears_reading_one_tensor_get_one_joint_scale():
    """Query/key/value-like siblings: s from max |W| over all their columns (the SmoothQuant paper's choice), so
    their inputs stay one tensor and the per-token kernel stacks them into one GEMM."""
    from qcast.backends.torch.kernels.dynamic import QLinearDynamic

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(D)
            self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, x):
            h = self.norm(x)
            return self.q(h) * self.k(h) + self.v(h)

    torch.manual_seed(0)
    model = QKV().eval()
    with torch.no_grad():
        model.norm.weight[3] = 40.0  # an outlier channel
        model.k.weight[:, 5] *= 10  # the siblings' weights differ per column
    calib = [torch.randn(2, 6, D) for _ in range(4)]
    x = torch.randn(2, 9, D)
    q = qcast.quantize(model, calib, config=qcast.QuantConfig(smoothquant=0.5), progress=False)
    stacks = [m for m in q.modules() if isinstance(m, QLinearDynamic) and m.splits]
    assert len(stacks) == 1 and stacks[0].owned_smooth and stacks[0].splits == [D, D, D]
    s = 1.0 / stacks[0].input_scale.double()
    w = torch.cat([model.q.weight, model.k.weight, model.v.weight]).detach()
    from qcast.smooth import smooth_scales
    absmax = torch.cat([model.norm(c).detach().abs().reshape(-1, D) for c in calib]).amax(0)
    assert torch.allclose(s, smooth_scales(absmax, w, 0.5), rtol=1e-5)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 25
    assert stacks[0].members == ["q", "k", "v"]
    from qcast.report.compare import _float_graph
    from qcast.smooth import mirror, smooth_nodes
    fgm, _ = _float_graph(model, (calib[0],), {}, qcast.QuantConfig(smoothquant=0.5))
    assert mirror(fgm, q.graph_module) == 3  # compare()'s float graph gets the stack's scales for each member
    assert all(torch.equal(sm.inv_s, stacks[0].input_scale) for _, sm in smooth_nodes(fgm))
