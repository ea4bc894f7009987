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
    """One conv module applied to two inputs of very different ranges (siamese / weight sharing)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)

    def forward(self, big, small):
        return self.conv(big), self.conv(small)


class SharedHardswish(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3)
        self.c2 = nn.Conv2d(4, 8, 3)
        self.act = nn.Hardswish()  # one activation module reused

    def forward(self, big, small):
        return self.act(self.c1(big)), self.act(self.c2(small))


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
