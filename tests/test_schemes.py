"""Quantization schemes by name (QuantConfig(weight=, activation=), qcast/schemes.py) and users' own quantizers
(qcast.FakeQuantizer, @qcast.register_quantizer, qcast/quantizers.py), post-training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import qcast
from qcast import ConfigError, QcastError, QuantConfig
from qcast.quantized import QDQ
from tests.helpers import sqnr


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def _model():
    torch.manual_seed(0)
    m = SmallCNN().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.2, 0.2)
        m.bn1.running_var.uniform_(0.5, 2.0)
    return m


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 1, 8, 8, generator=g) for _ in range(n)]


def _quantize(config, model=None):
    model = model or _model()
    q = qcast.quantize(model, _data(), config=config, backend="torch", progress=False, check_speed=False)
    return model, q


def _qdqs(q):
    return [m for m in q.qcast_qdq.modules() if isinstance(m, QDQ)]


def _is_pow2(x: float) -> bool:
    return x > 0 and math.log2(x) == round(math.log2(x))


def _agrees_with_simulation(q, x, floor=40.0):
    with torch.no_grad():
        sim, out = q.qcast_qdq(x), q(x)
    assert sqnr(sim, out) >= floor, f"int8 model vs its QDQ simulation: {sqnr(sim, out):.1f} dB"


# -- the registry and the config ----------------------------------------------------------------------
def test_builtin_schemes_are_registered_with_readable_reprs():
    for name in ("int8", "uint8", "int8_sym", "int4", "pow2"):
        assert name in qcast.SCHEMES
    assert repr(qcast.SCHEMES["int4"]) == "Scheme('int4', weight: 4-bit, symmetric)"
    assert "power-of-two" in repr(qcast.SCHEMES["pow2"])


def test_unknown_scheme_names_list_the_known_ones():
    with pytest.raises(ConfigError, match=r"weight='int5'.*'int8', 'int4', 'pow2'"):
        QuantConfig(weight="int5")
    with pytest.raises(ConfigError, match=r"activation='int4'.*is a weight scheme"):
        QuantConfig(activation="int4")
    with pytest.raises(ConfigError, match=r"per_layer\['fc'\]\.weight='nope'.*register_quantizer"):
        QuantConfig(per_layer={"fc": {"weight": "nope"}})
    with pytest.raises(ConfigError, match="weight_group_size=0"):
        QuantConfig(weight="int4", weight_group_size=0)


def test_schemes_round_trip_through_json():
    c = QuantConfig(weight="int4", weight_group_size=8, activation="int8_sym",
                    per_layer={"fc": {"weight": "pow2", "activation": "pow2", "weight_group_size": None}})
    assert QuantConfig.from_json(c.to_json()) == c
    # files written before schemes existed still load: no weight_group_size key
    old = {k: v for k, v in QuantConfig().to_dict().items() if k != "weight_group_size"}
    assert QuantConfig.from_dict(old) == QuantConfig()


def test_int4_conflicting_with_weight_bits_names_the_layer():
    c = QuantConfig(weight="int4", weight_bits=6)
    with pytest.raises(ConfigError, match="fc: weight='int4' is 4-bit but weight_bits=6"):
        c.weight_scheme("fc", "linear", "fc")


# -- built-in schemes, post-training ----------------------------------------------------------------------
def test_int4_is_weight_bits_4_and_explain_says_it_runs_on_int8_kernels():
    x = _data(1, seed=9)[0]
    _, q_name = _quantize(QuantConfig(weight="int4", rounding="nearest"))
    _, q_bits = _quantize(QuantConfig(weight_bits=4, rounding="nearest"))
    with torch.no_grad():
        assert torch.equal(q_name(x), q_bits(x))
    rows = [r for r in qcast.explain(q_name) if r.op in ("conv2d", "linear")]
    assert rows and all("int4 weights (ints in [-7, 7]) stored on the int8 grid, run on the int8 kernels" in r.reason
                        for r in rows), rows


def test_int4_groups_are_rerounded_per_channel_and_bad_groups_name_the_layer():
    model, q = _quantize(QuantConfig(weight="int4", weight_group_size=8, rounding="nearest", skip=["conv1"]))
    x = _data(1, seed=9)[0]
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 10
    _agrees_with_simulation(q, x)
    assert any("a scale per 8 inputs" in r.reason for r in qcast.explain(q))
    with pytest.raises(ConfigError, match="conv1.*weight_group_size=8 does not divide its 9 inputs"):
        _quantize(QuantConfig(weight="int4", weight_group_size=8, rounding="nearest"))


def test_int8_sym_activations_have_zero_point_0():
    model, q = _quantize(QuantConfig(activation="int8_sym"))
    qdqs = _qdqs(q)
    assert qdqs and all(m.qparams.zero_point == 128 and m.qparams.qmax == 255 for m in qdqs)
    x = _data(1, seed=9)[0]
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 25
    assert any("int8_sym activations (zero point 0" in r.reason for r in qcast.explain(q))


def test_pow2_scales_for_weights_and_activations_run_exactly_on_the_int8_kernels():
    model, q = _quantize(QuantConfig(weight="pow2", activation="pow2"))
    assert all(_is_pow2(m.qparams.scale) for m in _qdqs(q))
    kernels = [m for m in q.graph_module.modules() if hasattr(m, "weight_scales")]
    assert kernels and all(_is_pow2(float(s)) for k in kernels for s in k.weight_scales)
    x = _data(1, seed=9)[0]
    _agrees_with_simulation(q, x)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 20


def test_schemes_per_layer_and_save_load(tmp_path):
    config = QuantConfig(per_layer={"fc": {"weight": "pow2", "activation": "int8_sym"}, "conv2": {"weight": "int4"}},
                         rounding="nearest")
    _, q = _quantize(config)
    rows = {r.name: r.reason for r in qcast.explain(q)}
    assert "power-of-two" in rows["fc"] and "int4 weights" in rows["conv2"] and "int4" not in rows["conv1"]
    path = tmp_path / "m.qcast"
    qcast.save(q, path)
    back = qcast.load(path, backend="torch")
    x = _data(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(q(x), back(x))


# -- users' quantizers -----------------------------------------------------------------------------------
@qcast.register_quantizer("test_pow2_grid")
class Pow2Grid(qcast.FakeQuantizer):
    """Symmetric 8-bit, scale rounded up to a power of two, per tensor; declares its grid."""

    def scale(self, x=None):
        amax = x.detach().abs().max() if x is not None else torch.maximum(self.max_val, -self.min_val)
        return float(2.0 ** torch.ceil(torch.log2(amax.clamp_min(1e-8) / 127)))

    def forward(self, x):
        s = self.scale(x if self.max_val < self.min_val else None)
        q = torch.clamp(torch.round(x / s), -128, 127) * s
        return x + (q - x).detach()

    def grid(self, x=None):
        return qcast.Grid(8, self.scale(x if x is not None else None), 0, signed=True)


@qcast.register_quantizer("test_no_grid")
class TernaryWeights(qcast.FakeQuantizer):
    """Ternary weights {-a, 0, a}: no int8 grid declared, so layers using it are simulated."""

    applies_to = "weight"

    def forward(self, w):
        a = w.detach().abs().mean()
        q = torch.where(w.abs() > 0.7 * a, torch.sign(w) * a, torch.zeros_like(w))
        return w + (q - w).detach()


def test_a_registered_quantizer_with_a_grid_runs_on_int8_kernels():
    model, q = _quantize(QuantConfig(weight="test_pow2_grid", activation="test_pow2_grid"))
    assert all(_is_pow2(m.qparams.scale) and m.qparams.zero_point == 128 for m in _qdqs(q))
    rows = [r for r in qcast.explain(q) if r.op in ("conv2d", "linear")]
    assert all(r.precision == "int8" and "weight quantizer 'test_pow2_grid'" in r.reason for r in rows), rows
    x = _data(1, seed=9)[0]
    _agrees_with_simulation(q, x)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 20


def test_a_quantizer_without_a_grid_is_simulated_and_explain_says_so():
    model, q = _quantize(QuantConfig(per_layer={"conv2": {"weight": "test_no_grid"}}))
    row = next(r for r in qcast.explain(q) if r.name == "conv2")
    assert row.precision == "float" and "simulated" in row.reason and "'test_no_grid'" in row.reason
    w = q.qcast_qdq.get_submodule("conv2").conv.weight
    assert len(torch.unique(w.abs())) <= 2  # ternary: 0 and a
    x = _data(1, seed=9)[0]
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


@qcast.register_quantizer("test_uint4_act")
class Uint4Activations(qcast.FakeQuantizer):
    """Unsigned 4-bit activations on the observed range: declares a 4-bit grid the int8 kernels would not clamp to."""

    applies_to = "activation"
    bits = 4

    def _params(self):
        lo, hi = float(self.min_val.clamp(max=0)), float(self.max_val.clamp(min=0))
        scale = max(hi - lo, 1e-8) / 15
        return scale, int(round(-lo / scale))

    def forward(self, x):
        if not self.max_val >= self.min_val:
            return x
        s, zp = self._params()
        q = (torch.clamp(torch.round(x / s) + zp, 0, 15) - zp) * s
        return x + (q - x).detach()

    def grid(self, x=None):
        s, zp = self._params()
        return qcast.Grid(4, s, zp, signed=False)


def test_a_narrow_activation_grid_is_simulated_not_left_unclamped_by_the_int8_kernels():
    model, q = _quantize(QuantConfig(per_layer={"conv2": {"activation": "test_uint4_act"}}))
    row = next(r for r in qcast.explain(q) if r.name == "conv2")
    assert row.precision == "float" and "simulated" in row.reason and "4-bit activations" in row.reason, row
    assert "'test_uint4_act'" in row.reason
    x = _data(1, seed=9)[0]
    _agrees_with_simulation(q, x)
    # conv2 reads its input on the 4-bit grid: at most 16 levels, as declared
    seen = {}
    handle = q.qcast_qdq.get_submodule("conv2").register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        q.qcast_qdq(x)
    handle.remove()
    assert len(torch.unique(seen["x"])) <= 16


def test_quantizer_errors_name_the_quantizer_and_the_layer():
    with pytest.raises(ConfigError, match="decorates a subclass of qcast.FakeQuantizer"):
        qcast.register_quantizer("bad")(nn.Identity)
    with pytest.raises(ConfigError, match="'int8' is a built-in scheme"):
        qcast.register_quantizer("int8")(Pow2Grid)

    @qcast.register_quantizer("test_wrong_shape")
    class WrongShape(qcast.FakeQuantizer):
        applies_to = "weight"

        def forward(self, w):
            return w.flatten()

    @qcast.register_quantizer("test_nan")
    class NaNOut(qcast.FakeQuantizer):
        applies_to = "weight"

        def forward(self, w):
            return w / torch.zeros_like(w)

    with pytest.raises(QcastError, match=r"'test_wrong_shape' at fc \(weight\) returned \(160,\)"):
        _quantize(QuantConfig(per_layer={"fc": {"weight": "test_wrong_shape"}}))
    with pytest.raises(QcastError, match=r"'test_nan' at fc \(weight\) returned NaN/Inf"):
        _quantize(QuantConfig(per_layer={"fc": {"weight": "test_nan"}}))
