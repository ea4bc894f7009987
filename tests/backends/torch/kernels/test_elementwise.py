"""add / mul with a parameter/buffer operand or a run-time number operand (qcast/backends/torch/kernels/elementwise.py).

The float model is the oracle. Thresholds sit ~3 dB under the SQNR measured with the suite's protocol (default
config, 8 calibration batches of 2, held-out input, seed 0); the measured value is in the comment, and for the
constant cases also the SQNR of the same model with the op kept in float (``skip``), measured the same way.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcast
from qcast.backends.torch.kernels.elementwise import QBinaryConst, QScalarArg
from qcast.backends.torch.kernels.engines import engine_scope
from qcast.observers import qparams_from_range
from tests.helpers import assert_sqnr, quantize_small


def _fused_parts(reason: str) -> list[str]:
    return reason.rsplit("fused ", 1)[1].split("+") if "fused " in reason else []


class ConstOp(nn.Module):
    """conv -> ``fn(self, y)``; ``self.w`` a parameter (scale-like, around 1), ``self.b`` a buffer (shift-like)."""

    def __init__(self, fn, w_shape=(1, 8, 1, 1), b_shape=(8, 1, 1), linear=False):
        super().__init__()
        self.conv = nn.Linear(32, 8) if linear else nn.Conv2d(4, 8, 3, padding=1)
        self.w = nn.Parameter(torch.rand(w_shape) + 0.5)
        self.register_buffer("b", torch.randn(b_shape))
        self.head = nn.Linear(8, 4) if linear else nn.Conv2d(8, 4, 1)
        self.fn = fn

    def forward(self, x):
        return self.head(self.fn(self, self.conv(x)))


IMG = (2, 4, 16, 16)
SEQ = (2, 12, 32)

# id: (model factory, input shape, constants quantized, threshold dB)   # measured SQNR (dB): int8 op / op in float
CONST_CASES = {
    "mul_param_1C11": (lambda: ConstOp(lambda s, y: y * s.w), IMG, ["w"], 30.5),  # 33.9 / 34.0
    "mul_param_first": (lambda: ConstOp(lambda s, y: s.w * y), IMG, ["w"], 30.5),  # 33.9 / 34.0
    "add_buffer_C11": (lambda: ConstOp(lambda s, y: y + s.b), IMG, ["b"], 36.0),  # 39.3 / 39.3
    "add_relu_buffer": (lambda: ConstOp(lambda s, y: torch.relu(y + s.b)), IMG, ["b"], 35.5),  # 38.7 / 38.8
    "mul_then_add": (lambda: ConstOp(lambda s, y: y * s.w + s.b), IMG, ["w", "b"], 35.0),  # 38.3 / 39.3
    "add_full_shape": (lambda: ConstOp(lambda s, y: y + s.b, b_shape=(1, 8, 16, 16)), IMG, ["b"], 32.5),  # 35.6 / 36.7
    "layer_scale_last_dim": (lambda: ConstOp(lambda s, y: y * s.w, w_shape=(8,), linear=True), SEQ, ["w"], 32.0),  # 35.0 / 35.6
}


def _run_const(name, config=None):
    factory, shape, _, _ = CONST_CASES[name]
    torch.manual_seed(0)
    # static int8 edges between the layers (activation="auto" would run the 3-D linears per-token dynamic, float out)
    return quantize_small(factory(), shape, config={"activation": "int8", **(config or {})})


@pytest.mark.parametrize("name", list(CONST_CASES))
def test_op_with_a_constant_operand_runs_int8_and_matches_float(name):
    _, _, consts, threshold = CONST_CASES[name]
    r = _run_const(name)
    rows = r.rows
    assert all(row.precision == "int8" for row in rows), [row for row in rows if row.precision != "int8"]
    binary = [row for row in rows if row.op in ("add", "mul")]
    assert len(binary) == len(consts)
    for row, const in zip(binary, consts):
        assert f"constant '{const}' quantized once at convert time" in row.reason, row
    # the constants are weights: never observed, quantized once into the kernels that read them
    ranges = [row.name for row in r.qmodel.qcast_meta["calibration_summary"].ranges]
    assert not set(consts) & set(ranges), ranges
    kernels = [m for m in r.qmodel.modules() if isinstance(m, QBinaryConst)]
    assert len(kernels) == len(consts)
    assert not [n for n in r.qmodel.graph_module.graph.nodes if n.op == "get_attr"], "float copy of a constant kept"
    assert_sqnr(r.sqnr, threshold, name)


def test_constant_is_quantized_with_its_own_min_max_params():
    r = _run_const("mul_param_1C11")
    w = r.model.w.detach()
    k = next(m for m in r.qmodel.modules() if isinstance(m, QBinaryConst))
    lo, hi = min(float(w.min()), 0.0), float(w.max())
    assert k.const_scale == pytest.approx((hi - lo) / 255, rel=1e-6) and k.const_zero_point == 0
    back = (k.const_uint8.float() - k.const_zero_point) * k.const_scale
    assert back.shape == w.shape and float((back - w).abs().max()) <= k.const_scale / 2 + 1e-7


def test_add_relu_with_a_constant_says_the_relu_is_fused():
    r = _run_const("add_relu_buffer")
    row = next(row for row in r.rows if row.op == "add")
    assert not [row for row in r.rows if row.op == "relu"]
    assert _fused_parts(row.reason) == ["relu"], row.reason
    with torch.no_grad():
        assert float(torch.relu(r.model.conv(r.x) + r.model.b).min()) == 0.0  # the relu does clip on this data


def test_constant_operand_at_another_batch_size_and_resolution():
    r = _run_const("mul_then_add")
    x = torch.randn(5, 4, 9, 13, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, out = r.model(x), r.qmodel(x)
    assert out.shape == ref.shape
    assert_sqnr(qcast.report.sqnr(ref, out), 35.0, "constant operands at (5, 4, 9, 13)")  # measured 38.5 dB


ENGINES = [e for e in ("x86", "onednn", "fbgemm", "qnnpack") if e in torch.backends.quantized.supported_engines]
FNS = {"add": torch.add, "add_relu": lambda a, b: torch.relu(a + b), "mul": torch.mul}
# (activation shape, constant shape, activation layout)
BROADCASTS = [((2, 8, 6, 6), (1, 8, 1, 1), "contiguous"), ((2, 8, 6, 6), (1, 8, 1, 1), "channels_last"),
              ((2, 8, 6, 6), (8, 1, 1), "channels_last"), ((2, 8, 6, 6), (1, 1, 1, 6), "transposed"),
              ((2, 8, 6, 6), (6,), "contiguous"), ((1, 8, 6, 6), (1,), "contiguous"), ((2, 8, 6, 6), (), "contiguous"),
              ((2, 16, 7, 9), (1, 16, 7, 9), "channels_last"), ((3, 5, 16), (16,), "contiguous")]


def _quantized(t: torch.Tensor) -> torch.Tensor:
    qp = qparams_from_range(float(t.min()), float(t.max()))
    return torch.quantize_per_tensor(t, qp.scale, qp.zero_point, torch.quint8)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fn", list(FNS))
def test_constant_kernel_broadcasts_exactly_on_every_engine(engine, fn):
    """The evidence behind QBinaryConst: PyTorch's quantized add/add_relu/mul broadcast a constant against the
    activation on every engine (they dispatch on the global one) and every layout, each output within one step
    of quantize(dequantized activation op dequantized constant)."""
    g = torch.Generator().manual_seed(0)
    for act_shape, const_shape, layout in BROADCASTS:
        x = torch.randn(act_shape, generator=g)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        qx = _quantized(x.transpose(-1, -2).contiguous()).transpose(-1, -2) if layout == "transposed" else _quantized(x)
        c = torch.randn(const_shape, generator=g)
        out_qp = qparams_from_range(float(FNS[fn](x, c).min()), float(FNS[fn](x, c).max()))
        k = QBinaryConst.from_float(fn, c, out_qp.scale, out_qp.zero_point)
        with engine_scope(engine):
            out = k(qx)
        c_back = (k.const_uint8.float() - k.const_zero_point) * k.const_scale
        want = torch.quantize_per_tensor(FNS[fn](qx.dequantize(), c_back), out_qp.scale, out_qp.zero_point, torch.quint8)
        assert out.shape == want.shape, (act_shape, const_shape, layout)
        steps = int((out.int_repr().int() - want.int_repr().int()).abs().max())
        assert steps <= 1, f"{act_shape} {fn} {const_shape} ({layout}): {steps} steps off"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fn", list(FNS))
def test_number_kernel_rounds_once_on_every_engine(engine, fn):
    """QScalarArg holds the number exactly, so its output is within one step of quantize(dequantized x op v)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    qx = _quantized(x)
    for v in (0.37, -1.25, 0.0, 3, 1e-3):
        ref = FNS[fn](qx.dequantize(), torch.tensor(float(v)))
        out_qp = qparams_from_range(float(ref.min()), float(ref.max()))
        with engine_scope(engine):
            out = QScalarArg(fn, out_qp.scale, out_qp.zero_point)(qx, v)
        want = torch.quantize_per_tensor(ref, out_qp.scale, out_qp.zero_point, torch.quint8)
        assert out.shape == want.shape
        assert int((out.int_repr().int() - want.int_repr().int()).abs().max()) <= 1, (fn, v)


class Prepared(nn.Module):
    def __init__(self, fn, const):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.c = nn.Parameter(const, requires_grad=False)  # a parameter: fx traces ops on it (a buffer's are folded)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, self.conv(x))


# id: (fn, constant, words the reason must contain)
CONST_FLOAT = {
    "broadcasts_the_activation_up": (lambda s, y: y + s.c, torch.randn(3, 1, 8, 1, 1),
                                     ["broadcasts the activation of shape [2, 8, 16, 16] up to [3, 2, 8, 16, 16]"]),
    "other_dtype": (lambda s, y: y * s.c, torch.rand(1, 8, 1, 1, dtype=torch.float64), ["torch.float64", "promotes"]),
    "non_finite": (lambda s, y: y * s.c, torch.tensor([1.0, float("inf")] * 4).view(1, 8, 1, 1), ["inf or NaN"]),
}


@pytest.mark.parametrize("name", list(CONST_FLOAT))
def test_constant_operand_the_int8_kernel_cannot_take_stays_float_and_says_why(name):
    fn, const, words = CONST_FLOAT[name]
    torch.manual_seed(0)
    observed = qcast.prepare(Prepared(fn, const).eval(), torch.randn(*IMG))
    plans = {n.meta["qcast_name"]: n.meta["qcast_plan"] for n in observed.gm.graph.nodes if "qcast_plan" in n.meta}
    op = "mul" if name in ("other_dtype", "non_finite") else "add"
    assert plans[op].precision == "float", plans[op]
    for w in words:
        assert w in plans[op].reason, plans[op].reason
    assert plans["conv"].precision == "int8"


# ------------------------------------------------------------------------------------------------
# a Python number given at run time
# ------------------------------------------------------------------------------------------------
class NumberArg(nn.Module):
    """conv -> ``fn(y, v)`` with ``v`` a Python number passed to forward()."""

    def __init__(self, fn):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Conv2d(8, 2, 1)
        self.fn = fn

    def forward(self, x, v):
        return self.head(self.fn(self.conv(x), v))


#: the numbers calibration sees (they cover [-0.5, 0.5]); the held-out item gets the next one
CALIB_NUMBERS = (-0.5, 0.5, -0.25, 0.25, 0.0, 0.4, -0.4, 0.1, 0.3)
TEST_NUMBERS = (-0.45, 0.05, 0.35)


def _number_items():
    numbers = iter(CALIB_NUMBERS)
    return lambda g: (torch.randn(2, 3, 10, 10, generator=g), next(numbers))


# id: (fn, op, fused relu, threshold dB)   # measured SQNR (dB) at TEST_NUMBERS
NUMBER_CASES = {
    "add": (lambda y, v: y + v, "add", False, 29.0),  # 32.2 / 35.8 / 35.7
    "add_number_first": (lambda y, v: v + y, "add", False, 29.0),  # 32.2 / 35.8 / 35.7
    "mul": (lambda y, v: y * (v + 1.0), "mul", False, 29.5),  # 32.6 / 34.3 / 35.9 (v + 1.0: a number computed at run time)
    "mul_number_first": (lambda y, v: v * y, "mul", False, 26.0),  # 29.2 / 41.5 / 39.7
    "add_relu": (lambda y, v: torch.relu(y + v), "add", True, 34.0),  # 37.1 / 37.6 / 37.0
}


def _run_number(name, batches=8):
    fn = NUMBER_CASES[name][0]
    torch.manual_seed(0)
    return quantize_small(NumberArg(fn), _number_items(), batches=batches)


@pytest.mark.parametrize("name", list(NUMBER_CASES))
def test_number_passed_to_forward_runs_int8_and_matches_float(name):
    _, op, relu, threshold = NUMBER_CASES[name]
    r = _run_number(name)
    rows = {row.name: row for row in r.rows}
    assert all(row.precision == "int8" for row in r.rows), r.rows
    row = next(row for row in r.rows if row.op == op)
    assert "taken at run time" in row.reason and "requantized to calibrated output params" in row.reason, row
    assert _fused_parts(row.reason) == (["relu"] if relu else []), row.reason
    assert "relu" not in rows
    assert len([m for m in r.qmodel.modules() if isinstance(m, QScalarArg)]) == 1
    x = r.x[0]
    for v in TEST_NUMBERS + TEST_NUMBERS[:1]:  # a value again after another: the cached quantized number follows
        with torch.no_grad():
            ref, out = r.model(x, v), r.qmodel(x, v)
        assert_sqnr(qcast.report.sqnr(ref, out), threshold, f"{name} v={v}")


def test_number_operand_is_never_observed():
    torch.manual_seed(0)
    observed = qcast.prepare(NumberArg(lambda y, v: y + v).eval(), (torch.randn(2, 3, 10, 10), 0.5))
    observed_values = [n.meta["qcast_observes"] for n in observed.gm.graph.nodes if "qcast_observes" in n.meta]
    assert [n.meta.get("qcast_name", n.name) for n in observed_values] == ["x", "conv", "add"]  # head: the output, fp32
    assert not [n for n in observed_values if n.op == "placeholder" and n.target == "v"]
    r = _run_number("add")
    assert "v" not in [row.name for row in r.qmodel.qcast_meta["calibration_summary"].ranges]


def test_number_operand_accepts_int_and_0d_tensor_and_refuses_other_values():
    r = _run_number("add", batches=4)  # calibrated on -0.5, 0.5, -0.25, 0.25
    x = r.x[0]
    with torch.no_grad():
        # measured 33.4 dB at 0 and 33.9 at 0.25; 1 is outside the numbers calibration saw: the output is clipped to
        # the calibrated range like any activation, measured 27.2 dB
        for v, threshold in ((0, 30.0), (1, 24.0), (torch.tensor(0.25), 30.0), (torch.tensor(0), 30.0)):
            ref, out = r.model(x, v), r.qmodel(x, v)
            assert_sqnr(qcast.report.sqnr(ref, out), threshold, f"v={v!r}")
        assert torch.equal(r.qmodel(x, torch.tensor(0.25)), r.qmodel(x, 0.25))
        for bad in (torch.ones(2), None, float("nan")):
            with pytest.raises(qcast.InputError, match="number operand|takes a number"):
                r.qmodel(x, bad)


def test_number_computed_from_a_shape_runs_int8():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 8, 1)  # an int8 reader: without it the mul would run in float

        def forward(self, x):
            y = self.conv(x)
            return self.head(y * (y.shape[-1] ** -0.5))

    torch.manual_seed(0)
    r = quantize_small(Scaled(), (2, 3, 16, 16))
    row = next(row for row in r.rows if row.op == "mul")
    assert row.precision == "int8" and "taken at run time" in row.reason, row
    assert_sqnr(r.sqnr, 34.0, "y * (W ** -0.5)")  # measured 37.1 dB
    x = torch.randn(2, 3, 16, 25)  # another width, another number
    with torch.no_grad():
        assert_sqnr(qcast.report.sqnr(r.model(x), r.qmodel(x)), 30.0, "at width 25")  # measured 33.9 dB


def test_tensor_plus_tensor_add_relu_says_the_relu_is_fused():
    class PoolAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 8, 1)  # an int8 reader: without it the add would run in float

        def forward(self, x):
            y = self.conv(x)
            return self.head(torch.relu(F.max_pool2d(y, 2) + torch.sigmoid(F.avg_pool2d(y, 2))))

    torch.manual_seed(0)
    r = quantize_small(PoolAdd(), (2, 4, 12, 12), batches=2)
    row = next(row for row in r.rows if row.op == "add")
    assert row.precision == "int8" and row.reason == "requantized to calibrated output params; fused relu", row


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc(pool(x))): two activations of shapes (N, C, H, W) and (N, C, 1, 1)."""

    def __init__(self, gate_first: bool):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.fc = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)
        self.gate_first = gate_first

    def forward(self, x):
        y = torch.relu(self.conv(x))
        s = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))
        return self.head(s * y if self.gate_first else y * s)


@pytest.mark.parametrize("gate_first", [False, True])
def test_broadcasting_mul_of_two_activations_runs_int8(gate_first):
    torch.manual_seed(0)
    r = quantize_small(SqueezeExcite(gate_first), (2, 4, 12, 12))
    mul = next(row for row in r.rows if row.op == "mul")
    assert mul.precision == "int8", mul
    assert all(row.precision == "int8" for row in r.rows), [row for row in r.rows if row.precision != "int8"]
    assert_sqnr(r.sqnr, 38.0, f"squeeze-excite mul (gate first={gate_first})")  # measured 41.4


def test_activations_that_both_broadcast_stay_float_and_say_why():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 8, (3, 1))   # -> (N, 8, H-2, W)
            self.b = nn.Conv2d(4, 8, (1, 3))   # -> (N, 8, H, W-2)

        def forward(self, x):
            return self.a(x)[:, :, :, :1] * self.b(x)[:, :, :1, :]  # (N,8,H-2,1) * (N,8,1,W-2)

    torch.manual_seed(0)
    r = quantize_small(Outer(), (2, 4, 8, 8))
    mul = next(row for row in r.rows if row.op == "mul")
    assert mul.precision == "float" and "both broadcast" in mul.reason, mul
