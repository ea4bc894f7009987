"""QConv's residual-add path (``quantized::conv2d_add``): within half a step of float arithmetic on the same int8
weights, the accumulator left intact when the graph still needs it, and safe when an operand broadcasts at run
time though it matched at calibration."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qcast
from qcast.backends.torch.kernels.conv import QConv
from qcast.nn import FusedConv
from tests.helpers import assert_sqnr, quantize_small, run_isolated


def _q(t: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    return torch.quantize_per_tensor(t, scale, zp, torch.quint8).contiguous(memory_format=torch.channels_last)


def _reference(conv: nn.Conv2d, x: torch.Tensor, acc: torch.Tensor, act: str | None) -> torch.Tensor:
    """The same int8 weights, float arithmetic: conv(x) + accum, then act."""
    plain = QConv.from_float(conv, 1.0, 0, "onednn")
    w = plain.weight_int8.float() * plain.weight_scales.view(-1, 1, 1, 1)
    y = torch.nn.functional.conv2d(x.dequantize(), w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    y = y + acc.dequantize()
    return torch.relu(y) if act == "relu" else y


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("acc_zp,out_zp", [(0, 0), (7, 128)])
@pytest.mark.parametrize("groups,stride", [(1, 1), (4, 1), (1, 2)])
def test_conv_add_matches_float_arithmetic_within_half_a_step(act, acc_zp, out_zp, groups, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, stride=stride, padding=1, groups=groups).eval()
    x = _q(torch.rand(2, 8, 10, 10), 0.01, 3)
    acc_shape = (2, 8, 10 // stride, 10 // stride)
    acc = _q(torch.randn(acc_shape), 0.02, acc_zp)
    acc_before = acc.int_repr().clone()
    out_scale = 0.05
    q = QConv.from_float(FusedConv(conv, act=act, add=True), out_scale, out_zp, "onednn")
    q.clone_accum = True
    with torch.no_grad():
        out = q(x, acc)
        ref = _reference(conv, x, acc, act).clamp(-out_zp * out_scale, (255 - out_zp) * out_scale)
    assert out.q_scale() == out_scale and out.q_zero_point() == out_zp
    assert float(((out.dequantize() - ref) / out_scale).abs().max()) <= 0.5 + 1e-3
    assert torch.equal(acc.int_repr(), acc_before), "clone_accum: the accumulator must not be written"


def test_conv_add_when_accumulator_is_the_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    x = _q(torch.rand(1, 8, 6, 6), 0.01, 0)
    q = QConv.from_float(FusedConv(conv, act="relu", add=True), 0.05, 0, "onednn")
    q.clone_accum = True
    before = x.int_repr().clone()
    with torch.no_grad():
        out = q(x, x)
        ref = _reference(conv, x, x, "relu").clamp(0, 255 * 0.05)
    assert torch.equal(x.int_repr(), before)
    assert float(((out.dequantize() - ref) / 0.05).abs().max()) <= 0.5 + 1e-3


def test_conv_add_with_an_accumulator_that_broadcasts_at_run_time():
    """Calibrated where both operands were (1, C, H, W); at batch 4 the other operand broadcasts over the batch.
    The fused kernel would write 4 outputs into a 1-sample buffer: it must take the safe path instead."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    q = QConv.from_float(FusedConv(conv, act="relu", add=True), 0.05, 0, "onednn")
    x = _q(torch.rand(4, 8, 6, 6), 0.01, 0)
    acc = _q(torch.randn(1, 8, 6, 6), 0.02, 5)
    with torch.no_grad():
        out = q(x, acc)
        ref = _reference(conv, x, acc, "relu").clamp(0, 255 * 0.05)
    assert tuple(out.shape) == (4, 8, 6, 6)
    assert float(((out.dequantize() - ref) / 0.05).abs().max()) <= 1.0 + 1e-3  # float add: at most one rounding more


BROADCAST_AT_RUN_TIME = """
import torch, torch.nn as nn, qcast
torch.manual_seed(0)

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x, emb):
        return self.head(torch.relu(self.conv(x) + emb))

m = M().eval()
items = [(torch.randn(1, 3, 8, 8), torch.randn(1, 8, 8, 8)) for _ in range(4)]
q = qcast.quantize(m, items, config={"calibration": "minmax"}, progress=False)
assert any("add" in r.reason for r in qcast.explain(q) if r.op == "conv2d"), qcast.explain(q)
x, emb = torch.randn(4, 3, 8, 8), torch.randn(1, 8, 8, 8)
with torch.no_grad():
    ref, out = m(x, emb), q(x, emb)
assert out.shape == ref.shape, (tuple(ref.shape), tuple(out.shape))
snr = 10 * torch.log10((ref ** 2).sum() / ((ref - out) ** 2).sum())
print("SQNR", float(snr))
assert snr > 30, float(snr)
"""


def test_fused_residual_operand_that_broadcasts_only_at_run_time():
    # a child process: if the guard were missing, the out-of-bounds write would take the test session down
    proc = run_isolated(BROADCAST_AT_RUN_TIME)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return torch.relu(self.c(torch.relu(self.b(y))) + y)


def test_fused_residual_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    r = quantize_small(Residual(), (2, 4, 12, 12))
    assert_sqnr(r.sqnr, 30.0, "fused residual")
    fused = [m for m in r.qmodel.modules() if isinstance(m, QConv) and m.add]
    assert len(fused) == 1 and not fused[0].clone_accum  # nothing reads y after the add: overwritten in place
    qcast.save(r.qmodel, tmp_path / "m.qcast")
    loaded = qcast.load(tmp_path / "m.qcast")
    with torch.no_grad():
        assert torch.equal(loaded(r.x), r.out)


def test_each_input_shape_gets_its_own_packed_weight_with_identical_results():
    """PyTorch caches the oneDNN primitive on the first shape a packed weight sees (others are slow, see
    QConv._packed_for): QConv keeps one packed weight per shape, and results must not depend on call order."""
    torch.manual_seed(0)
    r = quantize_small(Residual(), (2, 4, 12, 12))
    shapes = [(1, 4, 12, 12), (3, 4, 12, 12), (1, 4, 20, 16)]
    xs = [torch.randn(s) for s in shapes]
    with torch.no_grad():
        first = [r.qmodel(x) for x in xs]             # shapes in one order ...
        again = [r.qmodel(x) for x in reversed(xs)]   # ... then the other
    for a, b in zip(first, reversed(again)):
        assert torch.equal(a, b)
    # an fp32-output conv (the last one: nothing int8 reads it) runs oneDNN's pointwise op, which has no per-shape cache
    convs = [m for m in r.qmodel.modules() if isinstance(m, QConv) and not m.float_out]
    assert convs
    for m in convs:
        assert len(m._packs) == min(len(shapes) + 1, QConv.MAX_PACKS)  # + the held-out input's batch-2 shape
    # past MAX_PACKS a new shape still runs (on the shared packed weight) and gives the same numbers
    x = torch.randn(5, 4, 9, 9)
    with torch.no_grad():
        out = r.qmodel(x)
        for m in convs:
            m._packs.clear()
        assert torch.equal(out, r.qmodel(x))


def test_functional_conv_and_linear_say_whether_their_weight_is_a_parameter():
    """The reason explain() gives must be true: a parameter weight is not 'computed at run time'."""
    import torch.nn.functional as F

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.register_buffer("proj", torch.randn(5, 4))

        def forward(self, x):
            y = F.conv2d(x, self.weight)
            y = F.conv2d(y, y[:1, :, :1, :1].permute(1, 0, 2, 3).expand(4, 4, 1, 1).contiguous())  # from the data
            return F.linear(y.mean((2, 3)), self.proj)

    qmodel = qcast.quantize(Functional().eval(), [torch.randn(1, 3, 8, 8)], progress=False, check_speed=False)
    rows = {r.name: r for r in qcast.explain(qmodel)}
    # a parameter/buffer weight: run as the layer, int8 (passes/functional_layers.py)
    assert rows["conv2d"].precision == "int8" and "written as F.conv2d" in rows["conv2d"].reason, rows["conv2d"]
    assert rows["linear"].precision == "int8" and "written as F.linear" in rows["linear"].reason, rows["linear"]
    assert rows["conv2d#2"].precision == "float", rows["conv2d#2"]
    assert "computed at run time (from an input" in rows["conv2d#2"].reason, rows["conv2d#2"].reason


# ------------------------------------------------------------------------------------------------
# fp32 output (placement: no int8 op reads the layer's output): oneDNN's qconv/qlinear_pointwise
# ------------------------------------------------------------------------------------------------
def _explicit(q: QConv, x: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """int8 input x int8 weight in float64 (the integers times their scales), + bias, + residual, then act."""
    xi = (x.int_repr().double() - x.q_zero_point()) * x.q_scale()
    w = q.weight_int8.double() * q.weight_scales.double().view(-1, *([1] * (q.weight_int8.dim() - 1)))
    b = None if q.bias is None else q.bias.double()
    if q.kind == "linear":
        y = torch.nn.functional.linear(xi, w, b)
    else:
        fn = torch.nn.functional.conv2d if q.kind == "conv2d" else torch.nn.functional.conv1d
        y = fn(xi, w, b, q.stride, q.padding, q.dilation, q.groups)
    if acc is not None:
        y = y + (acc.int_repr().double() - acc.q_zero_point()) * acc.q_scale()
    return {"relu": torch.relu, "relu6": lambda t: t.clamp(0, 6)}.get(q.act, lambda t: t)(y)


def _layer(kind: str, groups: int = 1, stride: int = 1) -> nn.Module:
    if kind == "linear":
        return nn.Linear(24, 10)
    if kind == "conv1d":
        return nn.Conv1d(8, 8, 3, stride=stride, padding=1, groups=groups)
    return nn.Conv2d(8, 8, 3, stride=stride, padding=1, groups=groups)


@pytest.mark.parametrize("engine", ["onednn", "x86"])  # x86: no fp32-output int8 conv, the fp32-arithmetic path
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("kind,groups,stride,shape", [
    ("conv2d", 1, 1, (2, 8, 9, 9)), ("conv2d", 8, 2, (2, 8, 9, 9)), ("conv2d", 4, 1, (1, 8, 7, 5)),
    ("conv1d", 1, 1, (2, 8, 30)), ("linear", 1, 1, (5, 24)), ("linear", 1, 1, (2, 7, 24))])
def test_fp32_output_matches_int8_times_int8_in_float64(engine, act, kind, groups, stride, shape):
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"{engine} not in this build")
    torch.manual_seed(0)
    layer = _layer(kind, groups, stride).eval()
    with torch.no_grad():
        layer.weight.mul_(4.0)
        layer.bias.add_(5.0)  # outputs beyond 6, so relu6 clips
    mod = layer if act is None else FusedConv(layer, act=act)
    q = QConv.from_float(mod, None, None, engine)
    assert q.float_out and q.act == act and not q.clamp6
    x = torch.quantize_per_tensor(torch.rand(shape) * 4 - 1, 4 / 255, 64, torch.quint8)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = q(x)
    ref = _explicit(q, x)
    assert out.dtype == torch.float32 and not out.is_quantized and out.shape == ref.shape
    if act == "relu6":  # the clip fires
        assert bool((ref == 6).any()) and float(out.max()) <= 6
    # exact integer sums: only the fp32 rounding of the scaled result differs
    assert float((out.double() - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("broadcast", [False, True])
def test_fp32_output_residual_add_leaves_the_accumulator_alone(act, broadcast):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    q = QConv.from_float(FusedConv(conv, act=act, add=True), None, None, "onednn")
    x = _q(torch.rand(2, 8, 6, 6), 0.01, 3)
    acc = _q(torch.randn(1 if broadcast else 2, 8, 6, 6), 0.02, 128)  # batch 1: broadcasts at run time
    before = acc.int_repr().clone()
    with torch.no_grad():
        out = q(x, acc)
    ref = _explicit(q, x, acc)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert float((out.double() - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert torch.equal(acc.int_repr(), before)


def test_fp32_output_flag_round_trips_through_spec_and_old_specs_load_as_requantizing():
    torch.manual_seed(0)
    q = QConv.from_float(nn.Linear(6, 3), None, None, "onednn")
    config, tensors = q.spec()
    assert config["float_out"] is True
    again = QConv.from_spec(config, tensors)
    x = torch.quantize_per_tensor(torch.rand(4, 6), 1 / 255, 0, torch.quint8)
    assert again.float_out and torch.equal(again(x), q(x))
    config.pop("float_out")  # a file written before placement: requantizing, as it was
    config.update(out_scale=0.01, out_zero_point=128)
    old = QConv.from_spec(config, tensors)
    assert not old.float_out and old(x).is_quantized


def test_an_engine_that_computes_a_layer_wrong_is_not_used_for_it(monkeypatch):
    """The engine choice checks each layer's int8 result on a probe input (on a Sapphire Rapids Xeon, oneDNN's int8
    conv with a (3, 1) kernel on few channels measured 0-9 dB against exact): a kernel that returns wrong values gets
    the layer moved to the next engine, and explain() says why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    real = QConv.forward

    def wrong_on_onednn(self, x, accum=None):
        y = real(self, x, accum)
        return y * 0.5 if self.engine == "onednn" and not y.is_quantized else (
            torch.quantize_per_tensor(y.dequantize() * 0.5, y.q_scale(), y.q_zero_point(), y.dtype)
            if self.engine == "onednn" else y)

    monkeypatch.setattr(QConv, "forward", wrong_on_onednn)
    r = quantize_small(model, (2, 8, 12, 12), config=qcast.QuantConfig(engine="auto", backend="torch"))
    convs = [row for row in r.rows if row.op == "conv2d"]
    assert convs and all(row.precision == "int8" and row.engine != "onednn" for row in convs), convs
    assert all("not on onednn" in row.reason and "computes this layer wrong" in row.reason for row in convs), convs
    assert_sqnr(r.sqnr, 25.0, "conv on the engine that computes it right")


@pytest.mark.parametrize("act", [None, "relu"])
def test_conv3d_runs_int8_on_its_engine_against_exact_int8_arithmetic(act):
    """Conv3d: quantized::conv3d (requantized) and oneDNN's qconv_pointwise (fp32 output; its conv3d takes no post-op,
    so relu is applied after it) against the same int8 values computed in float."""
    from qcast.backends.torch.kernels.conv import ConvKernel, QConv
    from qcast.nn import FusedConv
    from qcast.observers import fake_quant_weight

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 6, 3, padding=1, stride=(1, 2, 2)).eval()
    mod = FusedConv(conv, act=act) if act else conv
    x = torch.quantize_per_tensor(torch.rand(1, 4, 3, 8, 8) * 2 - 1, 2 / 255, 128, torch.quint8)
    ref = torch.nn.functional.conv3d(x.dequantize(), fake_quant_weight(conv.weight), conv.bias, conv.stride, conv.padding)
    ref = (ref.relu() if act else ref).detach()
    for engine in ("onednn", "x86", "fbgemm"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        ConvKernel._try(mod, (1, 4, 3, 8, 8), engine)  # the probe passes on every x86 engine
        fp32 = QConv.from_float(mod, None, None, engine)(x)
        assert float(10 * torch.log10(ref.pow(2).mean() / (ref - fp32).pow(2).mean())) > 100, engine
