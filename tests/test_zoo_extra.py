"""Architectures beyond the seed-shaped zoo (tests/models/extra.py), each quantized in one call.

Measured output SQNR (dB, default config, 8 calibration batches, held-out input): shufflenet 44.8,
squeezenet 52.7, densenet 45.1, efficientnet 45.0, mobilenetv3 44.3, inception 46.8, unet 38.8, fpn 42.8,
crnn 68.6, conv1d 51.5, gn_gelu 29.6, stubs_train 49.0. Thresholds sit 3 dB below.
"""
from __future__ import annotations

import copy

import pytest
import torch

import qcast
from tests.models import randomize_bn_stats
from tests.models.extra import EXTRA

SQNR = {"shufflenet": 44.8, "squeezenet": 52.7, "densenet": 45.1, "efficientnet": 45.0, "mobilenetv3": 44.3,
        "inception": 46.8, "unet": 38.8, "fpn": 42.8, "crnn": 68.6, "conv1d": 51.5, "gn_gelu": 29.6,
        "stubs_train": 49.0}


def _flat(o) -> torch.Tensor:
    if isinstance(o, dict):
        return torch.cat([_flat(v) for v in o.values()])
    if isinstance(o, (tuple, list)):
        return torch.cat([_flat(v) for v in o])
    return o.flatten()


def test_every_extra_model_has_a_measured_threshold():
    assert set(SQNR) == set(EXTRA)


@pytest.mark.parametrize("name", list(EXTRA))
def test_extra_architecture_quantizes_in_one_call(name):
    factory, shape = EXTRA[name]
    torch.manual_seed(0)
    model = factory()
    if name != "stubs_train":  # that one is handed over in train mode on purpose
        model.eval()
    randomize_bn_stats(model, 0)
    before = copy.deepcopy(model.state_dict())
    was_training = model.training
    data = [torch.randn(*shape) for _ in range(8)]
    x = torch.randn(*shape)
    qmodel = qcast.quantize(model, data, progress=False)
    assert model.training == was_training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model changed"
    rows = qcast.explain(qmodel)
    layers = [r for r in rows if r.op in ("conv1d", "conv2d", "linear")]
    assert layers and all(r.precision == "int8" for r in layers), [r for r in layers if r.precision != "int8"]
    assert all(r.reason for r in rows), [r for r in rows if not r.reason]
    model.eval()
    with torch.no_grad():
        ref, out = _flat(model(x)), _flat(qmodel(x))
    snr = float(10 * torch.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()))
    assert snr >= SQNR[name] - 3.0, f"{name}: {snr:.1f} dB (measured {SQNR[name]})"
