"""The model zoo end to end: one quantize() call per model, int8 coverage, fidelity against the float model.

Protocol (tests.helpers.quantize_zoo): small ZOO configuration, BN statistics randomized, default QuantConfig,
8 calibration batches of 2, a held-out test batch of 2. Thresholds are per output leaf, ~3 dB under the SQNR
measured with this protocol (value in the comment; seeds 1 and 2 measured within ~4 dB of seed 0).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import qcast
from tests.helpers import WEIGHTED_OPS, assert_sqnr, leaf_sqnrs, quantize_zoo, same_structure
from tests.models import OUTPUT_KINDS, UNTRACEABLE, ZOO, flatten_output

# name: per-leaf SQNR thresholds (dB)             measured (seed 0)
CNN_THRESHOLDS = {
    "resnet18": (31.0,),                          # 34.4
    "resnet50": (31.0,),                          # 34.9
    "vgg16": (28.0,),                             # 31.1
    "vgg16_bn": (31.0,),                          # 34.0
    "cifar_vgg_bn": (35.0,),                      # 38.6
    "tsn_r50": (29.0,),                           # 32.5
    "blazeface": (32.0, 42.0),                    # 35.0, 45.5
    "blazeface_landm": (34.0, 41.0, 32.0),        # 37.1, 44.4, 35.3
    "mobilenet_v2": (34.0,),                      # 37.4
    # GroupNorm after int8 convs amplifies relative error; int8 matches the fake-quant simulation (25.6 dB), so
    # this is the model's int8 accuracy, not a kernel fault
    "user_unet": (22.0,),                         # 25.6
    "user_unet_nogate": (22.0,),                  # 25.9
    "multitask_dict": (36.0, 42.0),               # 39.3, 45.2
    "detector_dataclass": (39.0, 49.0),           # 42.8, 52.5
}
#: int8 share of conv/linear rows: 100% except where a part is uncapturable (user_unet: the gate's 2 convs)
MIN_INT8_SHARE = {"user_unet": 0.70}

#: detectors at another resolution than calibrated (all 128x128 or 32x32): (input shape, per-leaf thresholds)
OTHER_RESOLUTION = {
    "blazeface": ((3, 3, 96, 160), (32.0, 41.0)),              # 35.1, 44.6
    "blazeface_landm": ((3, 3, 96, 160), (34.0, 41.0, 32.0)),  # 37.1, 44.3, 35.3
    "detector_dataclass": ((3, 3, 48, 64), (39.0, 49.0)),      # 42.7, 52.5
}


def test_every_zoo_entry_is_covered():
    assert set(ZOO) == set(CNN_THRESHOLDS) | {"deit_tiny"}, "a new ZOO model needs thresholds here"


@pytest.mark.parametrize("name", list(CNN_THRESHOLDS))
def test_zoo_cnn_quantizes_in_one_call(name):
    model, qmodel, x = quantize_zoo(name)
    assert isinstance(qmodel, torch.nn.Module) and qmodel is not model
    rows = qcast.explain(qmodel)

    weighted = [r for r in rows if r.op in WEIGHTED_OPS]
    share = sum(r.precision == "int8" for r in weighted) / len(weighted)
    assert share >= MIN_INT8_SHARE.get(name, 1.0), (
        f"{name}: {share:.0%} of conv/linear int8; float ones: {[r for r in weighted if r.precision != 'int8']}")
    float_weighted = {r.name for r in weighted if r.precision != "int8"}
    for region in UNTRACEABLE.get(name, ()):  # the only float conv/linear are inside uncapturable regions
        float_weighted = {n for n in float_weighted if not n.startswith(region + ".")}
    assert not float_weighted, float_weighted

    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    same_structure(ref, out)
    values = leaf_sqnrs(ref, out)
    for i, (value, threshold) in enumerate(zip(values, CNN_THRESHOLDS[name], strict=True)):
        assert_sqnr(value, threshold, f"{name} output {i}")


@pytest.mark.parametrize("name", [n for n in CNN_THRESHOLDS if OUTPUT_KINDS[n] != "tensor"])
def test_structured_output_kind_is_preserved(name):
    model, qmodel, x = quantize_zoo(name)
    with torch.no_grad():
        out = qmodel(x)
    kind = OUTPUT_KINDS[name]
    if kind == "dict":
        assert type(out) is dict and list(out) == list(model(x))
    elif kind == "dataclass":
        assert dataclasses.is_dataclass(out) and type(out) is type(model(x))
    else:
        assert type(out) is tuple
    assert all(t.dtype == torch.float32 and not t.is_quantized for t in flatten_output(out))


@pytest.mark.parametrize("name", list(OTHER_RESOLUTION))
def test_detector_at_another_resolution(name):
    shape, thresholds = OTHER_RESOLUTION[name]
    model, qmodel, calib_x = quantize_zoo(name)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    assert x.shape[-2:] != calib_x.shape[-2:] and x.shape[0] != calib_x.shape[0]
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    same_structure(ref, out)  # anchor counts follow the resolution
    assert flatten_output(out)[0].shape[1] != flatten_output(qmodel(calib_x))[0].shape[1]
    for i, (value, threshold) in enumerate(zip(leaf_sqnrs(ref, out), thresholds, strict=True)):
        assert_sqnr(value, threshold, f"{name} @ {tuple(shape)} output {i}")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "user_unet", "blazeface_landm"])
def test_explain_rows_are_well_formed(name):
    _, qmodel, _ = quantize_zoo(name)
    rows = qcast.explain(qmodel)
    assert rows and all(isinstance(r, qcast.OpInfo) for r in rows)
    names = [r.name for r in rows]
    assert len(names) == len(set(names)), "explain() names must be unique call sites"
    for r in rows:
        assert r.precision in ("int8", "float"), r
        assert (r.engine == "torch-float") == (r.precision == "float"), r
        assert r.op and r.reason, r
    assert rows == qcast.explain(qmodel)  # stable


def test_deit_tiny_int8_attention_and_fidelity():
    """Issue 4: linears, both attention matmuls and softmax int8; the residual stream (the adds and the
    class-token cat feeding layer norms), the layer norms on it and GELU stay float, each with its reason."""
    model, qmodel, x = quantize_zoo("deit_tiny")
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert out.shape == ref.shape and out.dtype == torch.float32 and not out.is_quantized
    rows = qcast.explain(qmodel)
    linears = [r for r in rows if r.op == "linear"]
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(linears) == n_linear == 9  # qkv, proj, fc1, fc2 per block (2 blocks) + head
    products = [r for r in rows if r.op in ("linear", "matmul", "bmm")]
    assert len(products) == 9 + 4  # + q @ k^T and attn @ v per block
    share = sum(r.precision == "int8" for r in products) / len(products)
    assert share >= 0.9, [r for r in products if r.precision != "int8"]
    assert any(r.op == "conv2d" and r.precision == "int8" for r in rows)  # the patch embedding
    assert [r.precision for r in rows if r.op == "softmax"] == ["int8", "int8"]
    for r in linears[:-1]:  # token sequences: per-token dynamic by default (activation="auto"), float output...
        assert "per-token dynamic" in r.reason, r
    for r in rows:  # ...so q * self.scale reads a float tensor and stays float (int8 under activation="int8")
        if r.op == "mul":
            assert r.precision == "float" and "is float, so it runs in float" in r.reason, r
    for r in rows:
        if r.op in ("add", "cat"):  # the residual stream
            assert r.precision == "float" and "residual stream into" in r.reason, r
        if r.op == "layer_norm":
            assert r.precision == "float" and "reads the residual stream" in r.reason, r
        if r.op == "gelu":
            assert r.precision == "float" and "by measurement" in r.reason, r
    # 31.6 dB (seed 0; seeds 1, 2: 30.1, 29.6); 6.2 dB with the residual stream int8; 31.5 dB with the matmuls and
    # softmax in float too; 29.3 dB with PyTorch's int8 GELU
    assert_sqnr(leaf_sqnrs(ref, out)[0], 28.5, "deit_tiny output")
