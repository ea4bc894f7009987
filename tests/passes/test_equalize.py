"""Cross-layer equalization (qcast.passes.equalize, QuantConfig(equalize=True)): same float function, the right pairs
skipped, ranges equalized, and output SQNR gained where per-channel activation ranges differ wildly."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn

import qcast
from qcast.errors import ConfigError
from qcast.nn import FusedConv
from tests.helpers import assert_sqnr, build_zoo, quantize_small, sqnr

cle = importlib.import_module("qcast.passes.equalize")  # the module; qcast.passes.equalize is the function


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=g))
    return model.eval()


def _block(act: type = nn.ReLU, cin: int = 8, hidden: int = 32, cout: int = 8) -> nn.Sequential:
    """conv1x1 -> BN -> act -> dw3x3 -> BN -> act -> conv1x1 -> BN (a MobileNetV2 inverted residual, no skip)."""
    torch.manual_seed(0)
    return _randomize_bn(nn.Sequential(
        nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act(),
        nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), act(),
        nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)))


def _disparity(model: nn.Sequential, decades: float = 3.0, seed: int = 0) -> nn.Sequential:
    """Depthwise output channel i (its BN's weight and bias) times c_i in 10**U(-decades/2, decades/2), the next 1x1
    conv's input column i divided by c_i: the same function (ReLU in between), channel ranges spread by 10**decades."""
    g = torch.Generator().manual_seed(seed)
    bn, project = model[4], model[6]
    c = 10 ** (torch.rand(bn.num_features, generator=g) * decades - decades / 2)
    with torch.no_grad():
        bn.weight.mul_(c)
        bn.bias.mul_(c)
        project.weight.div_(c.reshape(1, -1, 1, 1))
    return model


def _equalized(model: nn.Module, x: torch.Tensor, **config):
    """(prepared float graph with equalization, its Equalization record); observers pass values through."""
    observed = qcast.prepare(model, x, qcast.QuantConfig(equalize=True, **config))
    return observed, observed.gm.meta["qcast_equalization"]


def _rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((ref - out).abs().max() / ref.abs().max())


def _ranges(observed, first: str, second: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A's output-channel ranges, B's input-channel ranges) in the prepared graph (layers may be fused)."""
    a, b = (observed.gm.get_submodule(p) for p in (first, second))
    a, b = getattr(a, "conv", a), getattr(b, "conv", b)
    return cle._out_ranges(a), cle._in_ranges(b)


# ------------------------------------------------------------------------------------------------
# the float function is unchanged
# ------------------------------------------------------------------------------------------------
def test_conv_relu_dwconv_conv_chain_keeps_the_function_and_equalizes_ranges():
    model = _disparity(_block())
    x = torch.randn(2, 8, 12, 12)
    observed, eq = _equalized(model, x)
    assert [(p.first, p.second, p.through) for p in eq.pairs] == [("0", "3", ("2",)), ("3", "6", ("5",))]
    assert 1 < eq.sweeps < cle.MAX_SWEEPS, "the chain shares the depthwise conv: sweeps until the scales converge"
    with torch.no_grad():
        assert _rel_err(model(x), observed(x)) < 1e-4
    for p in eq.pairs:  # converged: both sides of every pair have the same range per channel
        r1, r2 = _ranges(observed, p.first, p.second)
        assert torch.allclose(r1, r2, rtol=1e-3), (p, (r1 / r2).min(), (r1 / r2).max())
    # the disparity is undone: the 3 decades of the depthwise scales come back as CLE scales
    assert eq.pairs[1].scale_max / eq.pairs[1].scale_min > 100


def test_grouped_conv_linear_and_commuting_ops_keep_the_function():
    """groups=4 conv (input channel i -> group i // 4), max-pool, zero pad, unfolded BN after relu (mean and bias
    rescaled), a global average pool + flatten into a linear."""
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.b = nn.Conv2d(16, 8, 3, groups=4)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            y = self.bn(torch.relu(self.a(x)))  # BN after relu: not folded, rescaled
            y = nn.functional.pad(nn.functional.max_pool2d(y, 2), (1, 1, 1, 1))
            return self.fc(torch.flatten(self.pool(torch.relu(self.b(y))), 1))

    model = _randomize_bn(Net())
    with torch.no_grad():
        model.a.weight[::3] *= 30.0  # uneven ranges: the scales are far from 1
    x = torch.randn(2, 3, 16, 16)
    observed, eq = _equalized(model, x)
    assert [(p.first, p.second) for p in eq.pairs] == [("a", "b"), ("b", "fc")]
    assert eq.pairs[0].through == ("relu", "bn", "max_pool", "pad")
    assert eq.pairs[0].scale_max / eq.pairs[0].scale_min > 3
    with torch.no_grad():
        assert _rel_err(model(x), observed(x)) < 1e-4
    r1, r2 = _ranges(observed, "a", "b")
    assert torch.allclose(r1, r2, rtol=1e-3)


def test_zoo_mobilenet_v2_keeps_the_function():
    model, input_fn = build_zoo("mobilenet_v2")
    for m in list(model.modules()):  # relu everywhere: every conv -> dw -> conv pair is equalized
        for name, child in m.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(m, name, nn.ReLU(inplace=True))
    x = input_fn(batch=2, seed=3)
    observed, eq = _equalized(model, x)
    assert len(eq.pairs) >= 30, eq
    with torch.no_grad():
        assert _rel_err(model(x), observed(x)) < 1e-4


# ------------------------------------------------------------------------------------------------
# what is left alone
# ------------------------------------------------------------------------------------------------
def test_relu6_pairs_are_skipped_and_the_relu6_kept():
    """The measured choice (docs/design.md): relu6 does not commute with the scaling; the pair is skipped."""
    assert cle.RELU6 == "skip"
    model = _block(nn.ReLU6)
    with torch.no_grad():
        model[1].bias.add_(5.0)  # the clip fires: any rescaling across it would change the function
    x = torch.randn(2, 8, 12, 12)
    observed, eq = _equalized(model, x)
    assert not eq.pairs
    assert [r for _, _, r in eq.skipped] == ["relu6 between them does not commute with the scaling"] * 2
    acts = [m.act for m in observed.gm.modules() if isinstance(m, FusedConv)]
    assert acts == ["relu6", "relu6"], "the relu6s are still there, fused into their convs"
    with torch.no_grad():
        assert _rel_err(model(x), observed(x)) < 1e-6


def test_relu6_policy_relu_replaces_the_clip(monkeypatch):
    monkeypatch.setattr(cle, "RELU6", "relu")
    model = _block(nn.ReLU6)
    x = torch.randn(2, 8, 12, 12) * 0.1  # small inputs: the clip never fires, so relu6 == relu here
    observed, eq = _equalized(model, x)
    assert len(eq.pairs) == 2 and len(eq.relu6_replaced) == 2 and eq.summary()["relu6_replaced"] == 2
    with torch.no_grad():
        assert _rel_err(model(x), observed(x)) < 1e-4


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.c.weight = self.b.weight  # tied

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y) + self.c(y)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


@pytest.mark.parametrize("cls, reason", [
    (_Tied, "shares a parameter with another module (tied weights)"),
    (_Branch, "has 2 consumers"),
    (_Twice, "is called at several places"),
])
def test_tied_weights_several_consumers_and_shared_modules_are_skipped(cls, reason):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        model.a.weight[::2] *= 20.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, model.a.in_channels, 6, 6)
    observed, eq = _equalized(model, x)
    assert not eq.pairs, eq.pairs
    assert eq.skipped and all(reason in r for _, _, r in eq.skipped), eq.skipped
    with torch.no_grad():
        assert _rel_err(model(x), observed(x)) < 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model was modified"


def test_layers_kept_in_float_are_not_rescaled():
    model = _disparity(_block())
    x = torch.randn(2, 8, 12, 12)
    _, eq = _equalized(model, x, skip=["6"])
    assert [(p.first, p.second) for p in eq.pairs] == [("0", "3")]
    assert eq.skipped == (("3", "6", "'6' is kept in float by the config"),)


# ------------------------------------------------------------------------------------------------
# fidelity, the model untouched, save/load, config
# ------------------------------------------------------------------------------------------------
def test_equalization_restores_sqnr_when_channel_ranges_differ_wildly(tmp_path):
    """Depthwise channels scaled over 3 decades, compensated in the next conv: one per-tensor activation scale
    cannot serve them, CLE undoes it. Measured 9.9 dB without CLE, 42.3 dB with (bias correction on; 8.6 / 41.8 dB
    without it); the same block without the disparity: 42.7 dB, 42.3 dB with CLE."""
    model = _disparity(_block())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    off = quantize_small(model, (2, 8, 12, 12))
    on = quantize_small(model, (2, 8, 12, 12), config=qcast.QuantConfig(equalize=True))
    assert_sqnr(on.sqnr, 39.0, "disparity block with CLE")
    assert on.sqnr > off.sqnr + 25.0, (off.sqnr, on.sqnr)  # measured +32.4 dB
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model was modified"
    meta = on.qmodel.qcast_meta["equalization"]
    assert meta["pairs"] == 2 and meta["scale_max"] / meta["scale_min"] > 100
    assert "equalization" not in off.qmodel.qcast_meta
    # explain() does not change: same ops, precisions and reasons
    assert [(r.name, r.op, r.precision, r.reason) for r in on.rows] == \
        [(r.name, r.op, r.precision, r.reason) for r in off.rows]
    path = tmp_path / "cle.safetensors"
    qcast.save(on.qmodel, path)
    loaded = qcast.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(on.x), on.qmodel(on.x)), "save/load changed the outputs"
    assert loaded.qcast_meta["equalization"] == meta


def test_config_validation_and_round_trip():
    assert qcast.QuantConfig().equalize is False
    with pytest.raises(ConfigError, match="equalize must be true or false"):
        qcast.QuantConfig(equalize="yes")
    with pytest.raises(ConfigError, match="equalize must be true or false"):
        qcast.QuantConfig.from_dict({"equalize": 1})
    cfg = qcast.QuantConfig(equalize=True)
    assert qcast.QuantConfig.from_json(cfg.to_json()) == cfg
    assert "equalize=True" in repr(cfg)
