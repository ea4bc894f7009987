"""Single-op models through the whole pipeline: each op runs int8 (per explain) and matches float (SQNR).

Every model is ``conv -> op`` (the conv supplies the int8 input a cheap op needs: qcast only keeps an op in int8
when one of its inputs already is), or the conv/linear variant itself. Thresholds sit ~3 dB under the SQNR measured
with the suite's protocol (default config, 8 calibration batches, held-out input, seed 0); the measured value is
in the table. Positive activations (``relu`` before pooling) keep the signal away from zero so SQNR is a fair
measure of the op, not of an all-noise output.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import quantize_small


class ConvThen(nn.Module):
    """conv (+ optional relu) feeding ``fn``: ``fn(self, y)``."""

    def __init__(self, fn, cin=4, cout=8, dims=2, relu=False):
        super().__init__()
        self.conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, cout, 3, padding=1)
        self.relu = relu
        self.fn = fn

    def forward(self, x):
        y = self.conv(x)
        if self.relu:
            y = torch.relu(y)
        return self.fn(self, y)


def chunk_add(s, y):
    a, b = y.chunk(2, dim=1)
    return a + b


def split_mul(s, y):
    a, b = torch.split(y, 4, dim=1)
    return a * torch.sigmoid(b)


IMG = (2, 4, 16, 16)
SEQ = (2, 4, 32)

# id: (model factory, input shape, ops that must be int8, threshold dB)   # measured SQNR (dB)
CASES = {
    # -- conv / linear variants -------------------------------------------------------------------
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)), IMG, ["conv2d"], 34.0),  # 37.1
    "conv2d_nobias_1x1": (lambda: nn.Sequential(nn.Conv2d(4, 8, 1, bias=False)), IMG, ["conv2d"], 34.0),  # 37.5
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(4, 8, 3, padding=1)), SEQ, ["conv1d"], 35.0),  # 38.3
    "grouped_conv": (lambda: nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=4)), (2, 8, 16, 16), ["conv2d"], 33.0),  # 37.0
    "depthwise_conv": (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8)), (2, 8, 16, 16), ["conv2d"], 34.0),  # 37.6
    "dilated_conv": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, dilation=2)), IMG, ["conv2d"], 34.0),  # 37.4
    "stride2_pad3_conv": (lambda: nn.Sequential(nn.Conv2d(4, 8, 7, stride=2, padding=3)), (2, 4, 17, 17), ["conv2d"], 33.0),  # 36.9
    "asymmetric_conv": (lambda: nn.Sequential(nn.Conv2d(4, 8, (3, 1), stride=(2, 1), padding=(1, 0))), IMG, ["conv2d"], 34.0),  # 37.8
    "linear": (lambda: nn.Sequential(nn.Linear(64, 16)), (8, 64), ["linear"], 35.0),  # 38.0
    "linear_3d_input": (lambda: nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)), (2, 12, 32), ["linear"], 32.0),  # 35.5
    # -- elementwise ------------------------------------------------------------------------------
    "add_tensor": (lambda: ConvThen(lambda s, y: torch.relu(y) + torch.sigmoid(y)), IMG, ["add", "relu", "sigmoid"], 37.0),  # 40.8
    "mul_tensor": (lambda: ConvThen(lambda s, y: torch.relu(y) * torch.sigmoid(y)), IMG, ["mul", "relu", "sigmoid"], 33.0),  # 36.2
    "add_scalar": (lambda: ConvThen(lambda s, y: y + 1.5), IMG, ["add"], 39.0),  # 42.8
    "add_scalar_first": (lambda: ConvThen(lambda s, y: 1.5 + y), IMG, ["add"], 39.0),  # 42.8
    "mul_scalar": (lambda: ConvThen(lambda s, y: y * 0.5), IMG, ["mul"], 34.0),  # 37.1
    "mul_negative_scalar": (lambda: ConvThen(lambda s, y: y * -2.0), IMG, ["mul"], 34.0),  # 37.1
    "cat_channels": (lambda: ConvThen(lambda s, y: torch.cat([torch.relu(y), y], 1)), IMG, ["cat", "relu"], 32.0),  # 35.6
    "cat_last_dim": (lambda: ConvThen(lambda s, y: torch.cat([y, y * 2.0], dim=-1)), IMG, ["cat", "mul"], 31.0),  # 34.7
    # -- pooling ----------------------------------------------------------------------------------
    "max_pool2d": (lambda: ConvThen(lambda s, y: F.max_pool2d(y, 2), relu=True), IMG, ["max_pool"], 38.0),  # 41.1
    "max_pool2d_module_ceil": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True)), IMG, ["max_pool"], 39.0),  # 42.6
    "avg_pool2d": (lambda: ConvThen(lambda s, y: F.avg_pool2d(y, 2), relu=True), IMG, ["avg_pool"], 34.0),  # 37.7
    "avg_pool2d_padded": (lambda: ConvThen(lambda s, y: F.avg_pool2d(y, 3, 2, padding=1, count_include_pad=False), relu=True), IMG, ["avg_pool"], 35.0),  # 38.2
    "adaptive_avg_pool2d_1": (lambda: ConvThen(lambda s, y: F.adaptive_avg_pool2d(y, 1), relu=True), IMG, ["adaptive_avg_pool"], 34.0),  # 37.3
    "adaptive_avg_pool2d_3x5": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d((3, 5))), IMG, ["adaptive_avg_pool"], 35.0),  # 38.1
    "pools_1d": (lambda: nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.MaxPool1d(2), nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(3)), SEQ, ["max_pool", "avg_pool", "adaptive_avg_pool"], 38.0),  # 41.7
    # -- shape ops --------------------------------------------------------------------------------
    "flatten": (lambda: ConvThen(lambda s, y: torch.flatten(y, 1)), IMG, ["flatten"], 34.0),  # 37.1
    "flatten_module_linear": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 10)), IMG, ["flatten", "linear"], 35.0),  # 38.1
    "view": (lambda: ConvThen(lambda s, y: y.view(y.shape[0], -1)), IMG, ["view"], 34.0),  # 37.1
    "reshape": (lambda: ConvThen(lambda s, y: y.reshape(y.shape[0], 8, -1)), IMG, ["reshape"], 34.0),  # 37.1
    # (a linear on the permuted 4-D tensor is per-token dynamic and reads float: the permute would then run in float)
    "permute": (lambda: ConvThen(lambda s, y: y.permute(0, 2, 3, 1)), IMG, ["permute"], 34.0),  # 37.1
    "transpose": (lambda: ConvThen(lambda s, y: y.transpose(1, 2)), IMG, ["transpose"], 34.0),  # 37.1
    "chunk": (lambda: ConvThen(chunk_add), IMG, ["chunk", "add"], 33.0),  # 36.0
    "split": (lambda: ConvThen(split_mul), IMG, ["split", "mul", "sigmoid"], 31.0),  # 34.4
    "squeeze_unsqueeze": (lambda: ConvThen(lambda s, y: y.unsqueeze(1).squeeze(1).contiguous()), IMG, ["unsqueeze", "squeeze"], 34.0),  # 37.1
    # -- activations ------------------------------------------------------------------------------
    "relu_after_pool": (lambda: ConvThen(lambda s, y: torch.relu(F.max_pool2d(y, 2))), IMG, ["relu", "max_pool"], 36.0),  # 39.5
    "relu6_standalone": (lambda: ConvThen(lambda s, y: F.relu6(F.max_pool2d(y * 4.0, 2))), IMG, ["relu6", "max_pool", "mul"], 36.0),  # 39.4
    "hardtanh": (lambda: ConvThen(lambda s, y: F.hardtanh(y, -0.5, 0.5)), IMG, ["hardtanh"], 32.0),  # 35.7
    "hardswish": (lambda: ConvThen(lambda s, y: F.hardswish(y)), IMG, ["hardswish"], 32.0),  # 35.4
    "hardswish_module": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3), nn.Hardswish()), IMG, ["hardswish"], 32.0),  # 35.7
    "sigmoid": (lambda: ConvThen(lambda s, y: torch.sigmoid(y)), IMG, ["sigmoid"], 44.0),  # 47.5
    "tanh": (lambda: ConvThen(lambda s, y: torch.tanh(y)), IMG, ["tanh"], 33.0),  # 36.7
    # -- resize -----------------------------------------------------------------------------------
    "interpolate_nearest": (lambda: ConvThen(lambda s, y: F.interpolate(y, scale_factor=2, mode="nearest")), IMG, ["interpolate"], 34.0),  # 37.1
    "interpolate_bilinear": (lambda: ConvThen(lambda s, y: F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)), IMG, ["interpolate"], 31.0),  # 34.3
    "interpolate_bilinear_size_ac": (lambda: ConvThen(lambda s, y: F.interpolate(y, size=(13, 11), mode="bilinear", align_corners=True)), IMG, ["interpolate"], 31.0),  # 34.6
    "upsample_module": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3), nn.Upsample(scale_factor=2, mode="nearest")), IMG, ["interpolate"], 34.0),  # 37.4
}


def _with_fc(model):
    if isinstance(model, ConvThen):
        model.fc = nn.Linear(model.conv.out_channels, 5)
    return model


class Probe(nn.Module):
    """``(model(x), reader(model(x)))``: an int8 conv/linear reads the op's output, so the op runs int8 and its output
    is requantized (qcast requantizes a value only where an int8 op reads it; at a model output the op would run in
    float). The first output is the op's, dequantized: what the SQNR of a case measures."""

    def __init__(self, model, shape):
        super().__init__()
        self.model = model
        with torch.no_grad():
            y = model(torch.randn(shape))
        self.reader = (nn.Linear(y.shape[-1], 4) if y.dim() == 2 else
                       nn.Conv1d(y.shape[1], 4, 1) if y.dim() == 3 else nn.Conv2d(y.shape[1], 4, 1))

    def forward(self, x):
        y = self.model(x)
        return y, self.reader(y)


def run_case(name: str, seed: int = 0):
    factory, shape, ops, _ = CASES[name]
    torch.manual_seed(seed)
    model = _with_fc(factory())
    if not set(ops) <= {"conv1d", "conv2d", "linear"}:  # a conv/linear writes fp32 at the output: measured as is
        model = Probe(model, shape)
    r = quantize_small(model, shape, seed=seed)
    if isinstance(model, Probe):
        r.ref, r.out = r.ref[0], r.out[0]
    return r


@pytest.mark.parametrize("name", list(CASES))
def test_op_runs_int8_and_matches_float(name):
    _, _, ops, threshold = CASES[name]
    r = run_case(name)
    rows = r.rows
    for op in ops:
        matching = [row for row in rows if row.op == op]
        assert matching, f"no '{op}' row in explain(): {rows}"
        assert all(row.precision == "int8" for row in matching), f"'{op}' not int8: {matching}"
        assert all(row.engine != "torch-float" for row in matching), matching
    assert all(row.precision == "int8" for row in rows), [row for row in rows if row.precision != "int8"]
    assert isinstance(r.out, torch.Tensor) and r.out.dtype == torch.float32 and not r.out.is_quantized
    assert r.sqnr >= threshold, f"{name}: SQNR {r.sqnr:.2f} dB < {threshold} dB"


def test_relu6_clamps_at_six():
    """A relu6 on int8 values that exceed 6 must saturate at 6 exactly like the float op (up to one step)."""
    torch.manual_seed(0)  # the conv's weights: independent of which tests ran before (this test flipped with them)
    r = quantize_small(ConvThen(lambda s, y: F.relu6(F.max_pool2d(y * 8.0, 2))), IMG)
    assert float(r.ref.max()) == 6.0  # the float model does saturate on this data
    levels = r.out.unique()
    step = float((levels[1:] - levels[:-1]).min())  # the int8 grid the relu6 output lives on
    assert float(r.out.max()) <= 6.0 + step and float(r.out.min()) >= 0.0


def test_sigmoid_and_tanh_output_ranges():
    r = quantize_small(ConvThen(lambda s, y: torch.stack([torch.sigmoid(y * 4), torch.tanh(y * 4)])), IMG)
    # stack has no kernel: both inputs are dequantized, so the ranges come from the fixed int8 params
    sig, tanh = r.out[0], r.out[1]
    assert 0.0 <= float(sig.min()) and float(sig.max()) <= 1.0
    assert -1.0 <= float(tanh.min()) and float(tanh.max()) <= 1.0


# ------------------------------------------------------------------------------------------------
# ops without an int8 kernel
# ------------------------------------------------------------------------------------------------
class FloatIsland(nn.Module):
    """conv -> (op without kernel) -> conv: the op runs in float, both convs int8, nothing quantized leaks."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.LayerNorm([8, 16, 16]) if kind == "layer_norm_module" else nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv1(x)
        if self.kind == "exp":
            y = torch.exp(y * 0.5)
        elif self.kind == "layer_norm":
            y = F.layer_norm(y, y.shape[1:])
        elif self.kind in ("layer_norm_module", "group_norm"):
            y = self.norm(y)
        elif self.kind == "softmax":
            y = torch.softmax(y, dim=1)
        elif self.kind == "gelu":
            y = F.gelu(y)
        elif self.kind == "sub":
            y = y - 0.5
        return self.conv2(y)


# nn.LayerNorm, softmax and gelu have int8 kernels now (tests/backends/torch/kernels/test_attention.py); F.layer_norm with a
# normalized_shape computed at run time (y.shape[1:]) still runs in float
NO_KERNEL = {  # kind: (op name in explain, threshold)   # measured SQNR
    "exp": ("exp", 36.0),  # 40.0
    "layer_norm": ("layer_norm", 30.0),  # 33.4
    "group_norm": ("group_norm", 30.0),  # 33.2
    "sub": ("sub", 32.0),  # 35.9
}


@pytest.mark.parametrize("kind", list(NO_KERNEL))
def test_op_without_kernel_runs_in_float_between_int8_ops(kind):
    op, threshold = NO_KERNEL[kind]
    torch.manual_seed(0)
    model = FloatIsland(kind)
    seen_quantized = []
    r = quantize_small(model, IMG)
    rows = r.rows
    row = next(row for row in rows if row.op == op)
    assert row.precision == "float" and row.engine == "torch-float"
    assert row.reason, row
    assert {x.name: x.precision for x in rows if x.op == "conv2d"} == {"conv1": "int8", "conv2": "int8"}

    # no quantized tensor reaches a float module of the quantized model
    hooks = [m.register_forward_pre_hook(lambda m, args: seen_quantized.extend(
        a for a in args if isinstance(a, torch.Tensor) and a.is_quantized))
        for m in r.qmodel.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
    try:
        with torch.no_grad():
            out = r.qmodel(r.x)
    finally:
        for h in hooks:
            h.remove()
    assert not seen_quantized, "a quantized tensor reached a float module"
    assert out.dtype == torch.float32 and not out.is_quantized
    assert r.sqnr >= threshold, f"{kind}: SQNR {r.sqnr:.2f} dB < {threshold} dB"


@pytest.mark.parametrize("kind", ["exp", "layer_norm"])
def test_op_without_kernel_reason_names_the_op(kind):
    torch.manual_seed(0)
    r = quantize_small(FloatIsland(kind), IMG, batches=2)
    row = next(row for row in r.rows if row.op == kind)
    assert kind in row.reason and "int8" in row.reason, row.reason


def test_float_output_of_int8_graph_is_plain_float32_everywhere():
    """Every output leaf of a model ending in int8 ops comes back as an ordinary float32 tensor."""

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            a, b = y.chunk(2, 1)
            return {"pooled": F.max_pool2d(y, 2), "flat": torch.flatten(y, 1), "parts": [a, b], "raw": y}

    torch.manual_seed(0)
    r = quantize_small(Heads(), IMG, batches=2)
    leaves = [r.out["pooled"], r.out["flat"], *r.out["parts"], r.out["raw"]]
    assert all(t.dtype == torch.float32 and not t.is_quantized for t in leaves)
    assert isinstance(r.out["parts"], list) and len(r.out["parts"]) == 2


def test_padding_modes_without_kernel_stay_float_with_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), nn.Conv2d(8, 8, 3, padding="same"))
    r = quantize_small(model, IMG, batches=2)
    rows = r.rows
    assert [row.precision for row in rows] == ["float", "float"]
    assert "reflect" in rows[0].reason and "same" in rows[1].reason
    assert r.sqnr > 100  # the whole model ran in float: identical up to rounding
