"""convert(): observed model -> int8 model; what it records and what it must not share."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qcast
from tests.helpers import assert_sqnr, leaf_sqnrs, quantize_small, sqnr


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 12, 12, generator=g) for _ in range(n)]


def test_convert_records_what_it_did():
    observed = qcast.prepare(_net(), _data(1)[0], {"calibration": "minmax"})
    qcast.calibrate(observed, _data(3), progress=False)
    qmodel = qcast.convert(observed)
    assert isinstance(qmodel, qcast.QuantizedModel)
    meta = qmodel.qcast_meta
    assert meta["backend"] == "torch" and meta["calibration_batches"] == 3
    assert qcast.QuantConfig.from_dict(meta["config"]).calibration == "minmax"
    assert "2/2 ops int8" in repr(qmodel)


def test_convert_twice_gives_identical_models_and_leaves_observed_usable():
    observed = qcast.prepare(_net(), _data(1)[0])
    qcast.calibrate(observed, _data(4), progress=False)
    x = _data(1, seed=9)[0]
    with torch.no_grad():
        float_out = observed(x)
        q1, q2 = qcast.convert(observed), qcast.convert(observed)
        assert torch.equal(q1(x), q2(x))
        assert torch.equal(observed(x), float_out)  # still the float model with pass-through observers
        assert sqnr(_net()(x), float_out) > 100


def test_unknown_backend_is_unsupported():
    observed = qcast.prepare(_net(), _data(1)[0])
    qcast.calibrate(observed, _data(1), progress=False)
    with pytest.raises(qcast.UnsupportedError, match="backend"):
        qcast.convert(observed, backend="tensorrt")
    with pytest.raises(qcast.UnsupportedError, match="backend"):
        qcast.quantize(_net(), _data(1), backend="tensorrt", progress=False)


class SharedConv(nn.Module):
    """One conv module applied to two inputs of very different ranges (siamese / weight sharing). Each site's output
    is read by an int8 conv (h1, h2), so it is requantized, to that site's own params."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.h1, self.h2 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, big, small):
        return self.h1(self.conv(big)), self.h2(self.conv(small))


class SharedHardswish(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3)
        self.c2 = nn.Conv2d(4, 8, 3)
        self.act = nn.Hardswish()  # one activation module reused
        self.h1, self.h2 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)  # int8 readers: the hardswish stays int8

    def forward(self, big, small):
        return self.h1(self.act(self.c1(big))), self.h2(self.act(self.c2(small)))


def _big_small(g):
    return torch.randn(2, 4, 12, 12, generator=g) * 8.0, torch.randn(2, 4, 12, 12, generator=g)


@pytest.mark.parametrize("model", [SharedConv, SharedHardswish])
def test_module_called_at_several_places_keeps_per_site_output_ranges(model):
    torch.manual_seed(0)
    r = quantize_small(model(), _big_small)
    rows = r.rows
    assert len([x for x in rows if x.precision == "int8"]) == len(rows)
    for i, value in enumerate(leaf_sqnrs(r.ref, r.out)):
        assert_sqnr(value, 30.0, f"{model.__name__} output {i}")  # measured: output 0 3.5 (conv) / 4.3 (hardswish) dB, output 1 37.6 / 35.1 dB


def test_quantized_model_is_returned_in_eval_mode():
    observed = qcast.prepare(_net(), _data(1)[0])
    qcast.calibrate(observed, _data(2), progress=False)
    for qmodel in (qcast.convert(observed), qcast.quantize(_net(), _data(2), progress=False)):
        assert not qmodel.training
        assert not [name for name, m in qmodel.named_modules() if m.training]


# ------------------------------------------------------------------------------------------------
# bias correction: b' = b - (W_q - W) E[x]
# ------------------------------------------------------------------------------------------------
def test_corrected_bias_of_a_tiny_linear_equals_the_formula_by_hand():
    lin = nn.Linear(3, 2).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.3333, -0.51], [0.01, -2.0, 0.777]]))
        lin.bias.copy_(torch.tensor([0.5, -0.25]))
    model = nn.Sequential(lin).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, generator=g) + torch.tensor([10.0, -4.0, 2.0]) for _ in range(3)]
    mean = torch.cat(calib).double().mean(0)
    w = lin.weight.detach().double()
    scales = w.abs().amax(1, keepdim=True) / 127  # per-row symmetric int8
    w_q = torch.round(w / scales) * scales
    expected = lin.bias.detach().double() - (w_q - w) @ mean
    assert (expected - lin.bias.double()).abs().max() > 1e-3  # the correction is not negligible here
    observed = qcast.prepare(model, calib[0], {"bias_correction": True})
    qcast.calibrate(observed, calib, progress=False)
    from qcast.convert import to_qdq
    layer = next(m for m in to_qdq(observed).modules() if isinstance(m, nn.Linear))
    assert torch.allclose(layer.weight.double(), w_q, atol=1e-6)
    assert torch.allclose(layer.bias.double(), expected, atol=1e-6), (layer.bias, expected)
    # the lowered int8 kernel reads the corrected bias from the QDQ graph
    qmodel = qcast.convert(observed)
    assert torch.allclose(qmodel.graph_module.get_submodule("0").bias.double(), expected, atol=1e-6)
    assert torch.equal(lin.bias, torch.tensor([0.5, -0.25]))  # the user's model is untouched


def test_conv_correction_accounts_for_zero_padding_exactly():
    """Calibration images constant per channel: the mean of the weight-rounding error over the data and every output
    position (borders included) is exactly what the corrected bias removes."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 3, 3, padding=1, bias=False).eval()  # no bias: the correction creates one
    g = torch.Generator().manual_seed(1)
    calib = [(torch.rand(2, 4, 1, 1, generator=g) * 3 + 1).expand(2, 4, 5, 5).contiguous() for _ in range(3)]
    observed = qcast.prepare(nn.Sequential(conv), calib[0], {"bias_correction": True, "calibration": "minmax"})
    qcast.calibrate(observed, calib, progress=False)
    from qcast.convert import to_qdq
    qdq = to_qdq(observed)
    layer = next(m for m in qdq.modules() if isinstance(m, nn.Conv2d))
    w_q = layer.weight.detach().double()
    dw = w_q - conv.weight.detach().double()
    err = torch.cat([nn.functional.conv2d(x.double(), dw, padding=1) for x in calib])
    expected = -err.mean(dim=(0, 2, 3))
    assert torch.allclose(layer.bias.detach().double(), expected, atol=1e-6)
    # ignoring the padding (E[x] everywhere) would give a different, wrong bias on a 5x5 input
    mean = torch.cat(calib).double().mean(dim=(0, 2, 3))
    no_padding = -(dw.sum(dim=(2, 3)) @ mean)
    assert (no_padding - expected).abs().max() > 1e-4


def _biased_net(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 1)).eval()
    with torch.no_grad():
        for conv in (m[0], m[2]):
            w = conv.weight.view(conv.out_channels, -1)
            w.mul_(0.05 / w.std())
            w[:, 0] = 1.0  # one large weight per output channel: a coarse int8 step for all the others
    return m


def _biased_data(seed):
    g = torch.Generator().manual_seed(seed)
    return 4.0 + torch.rand(4, 64, 6, 6, generator=g)  # post-relu-like features with a large mean, narrow spread


def test_bias_correction_improves_output_sqnr_when_weight_rounding_has_a_mean_effect():
    # measured over model seeds 0-4: +2.5, +7.2, +5.9, +1.7, +1.8 dB (int8, mse estimator)
    model = _biased_net(1)
    calib, x = [_biased_data(i) for i in range(6)], _biased_data(100)
    with torch.no_grad():
        ref = model(x)
        off = sqnr(ref, qcast.quantize(model, calib, config={"bias_correction": False}, progress=False)(x))
        on = sqnr(ref, qcast.quantize(model, calib, config={"bias_correction": True}, progress=False)(x))
    assert on >= off + 4.0, (off, on)  # measured 29.3 -> 36.4 dB


def test_bias_correction_needs_means_from_calibrate():
    observed = qcast.prepare(_net(), _data(1)[0], {"bias_correction": True})
    with torch.no_grad():
        for x in _data(2):
            observed(x)  # observers see data, but no input means were collected
    with pytest.raises(qcast.NotCalibratedError, match="bias_correction"):
        qcast.convert(observed)
    qcast.calibrate(observed, _data(2), progress=False)
    assert qcast.convert(observed) is not None


def test_calibration_without_bias_correction_leaves_no_hooks_and_biases_untouched():
    model = _net()
    observed = qcast.prepare(model, _data(1)[0], {"bias_correction": False})
    qcast.calibrate(observed, _data(2), progress=False)
    assert observed.qcast_input_stats == {}
    from qcast.convert import to_qdq
    qdq = to_qdq(observed)
    biases = [m.bias for m in qdq.modules() if isinstance(m, nn.Conv2d)]
    assert all(torch.equal(b, ref.bias) for b, ref in zip(biases, (model[0], model[2])))
    on = qcast.prepare(model, _data(1)[0], {"bias_correction": True})
    qcast.calibrate(on, _data(2), progress=False)
    assert not any(m._forward_pre_hooks for m in on.gm.modules())  # hooks are removed after calibration
