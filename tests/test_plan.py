"""Placement (qcast/plan.py, ``place_outputs``): an int8 op's inputs are quantized; its output is requantized only
where an int8 op reads it. Model outputs and values read only by float ops stay float. The float model is the
oracle; the QDQ simulation (``to_qdq`` run in float) is what the int8 model must match."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import qcast
from qcast.convert import to_qdq
from qcast.backends.torch.kernels.conv import QConv
from qcast.quantized import QDQ
from tests.helpers import assert_sqnr, sqnr


def _calibrated(model, shape, n=8, seed=0, make=torch.randn):
    g = torch.Generator().manual_seed(seed)
    data = [make(*shape, generator=g) for _ in range(n)]
    observed = qcast.prepare(model, data[0])
    qcast.calibrate(observed, data, progress=False)
    return observed, data, make(*shape, generator=g)


def _rows(qmodel):
    return {r.name: r for r in qcast.explain(qmodel)}


def _producer_of_output(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return out.args[0]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_final_linear_writes_fp32_with_no_qdq_after_it_and_beats_the_logits_cap():
    torch.manual_seed(0)
    model = MLP().eval()
    observed, data, x = _calibrated(model, (16, 64), make=torch.rand)  # image-like inputs in [0, 1]
    qdq = to_qdq(observed)
    last = _producer_of_output(qdq)
    assert last.op == "call_module" and last.target == "fc2"  # the logits come straight from fc2: no QDQ point
    assert not [u for u in last.users if isinstance(qdq.get_submodule(u.target) if u.op == "call_module" else None, QDQ)]
    fc1 = next(n for n in qdq.graph.nodes if n.target == "fc1")
    assert any(u.op == "call_module" and isinstance(qdq.get_submodule(u.target), QDQ) for u in fc1.users)  # fc2 reads it

    qmodel = qcast.convert(observed)
    fc2 = qmodel.graph_module.get_submodule("fc2")
    assert isinstance(fc2, QConv) and fc2.float_out and not qmodel.graph_module.get_submodule("fc1").float_out
    rows = _rows(qmodel)
    assert rows["fc2"].precision == "int8" and "fp32 output (no int8 op reads it)" in rows["fc2"].reason, rows["fc2"]
    assert "fp32 output" not in rows["fc1"].reason
    with torch.no_grad():
        ref, out, sim = model(x), qmodel(x), qdq(x)
    assert out.dtype == torch.float32 and not out.is_quantized
    assert_sqnr(sqnr(sim, out), 60.0, "int8 model vs its QDQ simulation")  # fp32 rounding only
    # the old placement requantized the logits: per-tensor 8 bits over the calibrated logit range (min-max here).
    # That rounding alone, even on exact logits, caps the SQNR (measured: cap 44.5 dB; the old placement, i.e. this
    # model's output rounded so, 42.2 dB; this model 46.1 dB)
    with torch.no_grad():
        cal = torch.cat([model(d) for d in data])
    lo, hi = min(float(cal.min()), 0.0), max(float(cal.max()), 0.0)
    scale = (hi - lo) / 255
    zp = int(round(-lo / scale))
    cap = sqnr(ref, torch.fake_quantize_per_tensor_affine(ref, scale, zp, 0, 255))
    old = sqnr(ref, torch.fake_quantize_per_tensor_affine(out, scale, zp, 0, 255))
    new = sqnr(ref, out)
    assert new > cap and new > old + 3.0, (new, cap, old)


class PoolHead(nn.Module):
    """conv -> relu -> max_pool -> flatten -> output: the passthrough tail has no int8 reader."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.flatten(F.max_pool2d(y, 2), 1)


def test_passthrough_ops_with_no_int8_reader_run_in_float_on_an_fp32_conv_output():
    torch.manual_seed(0)
    model = PoolHead().eval()
    observed, _, x = _calibrated(model, (2, 3, 16, 16))
    qmodel = qcast.convert(observed)
    rows = _rows(qmodel)
    for op in ("max_pool2d", "flatten"):
        row = next(r for r in rows.values() if r.op == op.replace("2d", ""))
        assert row.precision == "float" and "no int8 op reads its output" in row.reason, row
    assert rows["conv2"].precision == "int8" and "fp32 output" in rows["conv2"].reason
    assert rows["conv2"].reason.endswith("fused relu")  # the relu still applies, inside the fp32-output conv
    assert rows["conv1"].precision == "int8" and "fp32 output" not in rows["conv1"].reason
    with torch.no_grad():
        ref, out, sim = model(x), qmodel(x), to_qdq(observed)(x)
    assert float(out.min()) >= 0.0  # fused relu
    assert_sqnr(sqnr(sim, out), 60.0, "vs QDQ simulation")
    assert_sqnr(sqnr(ref, out), 35.0, "vs float")


class CatTail(nn.Module):
    """Two convs concatenated at the output (a cat with no int8 reader: no fp32-output int8 cat), and a value read
    both by int8 convs and returned as an output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        return torch.cat([self.a(s), self.b(s)], 1), s


def test_a_cat_with_no_int8_reader_runs_in_float_on_fp32_conv_outputs():
    torch.manual_seed(0)
    model = CatTail().eval()
    observed, _, x = _calibrated(model, (2, 3, 12, 12))
    qmodel = qcast.convert(observed)
    rows = _rows(qmodel)
    assert rows["cat"].precision == "float" and "no int8 op reads its output" in rows["cat"].reason
    for name in ("a", "b"):
        assert rows[name].precision == "int8" and "fp32 output" in rows[name].reason, rows[name]
    # stem: read by a and b (int8) and returned: requantized, and the output is its dequantized int8 value
    assert "fp32 output" not in rows["stem"].reason
    qdq = to_qdq(observed)
    with torch.no_grad():
        (ra, rs), (qa, qs), (sa, ss) = model(x), qmodel(x), qdq(x)
    assert not qa.is_quantized and not qs.is_quantized
    assert_sqnr(sqnr(sa, qa), 60.0, "cat output vs QDQ simulation")
    assert_sqnr(sqnr(ss, qs), 60.0, "stem output vs QDQ simulation")
    assert_sqnr(sqnr(ra, qa), 35.0, "cat output vs float")


class ResidualTail(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return torch.relu(self.conv(y) + y)


def test_fused_residual_add_at_the_output_writes_fp32_and_leaves_its_operand_intact(tmp_path):
    if "onednn" not in torch.backends.quantized.supported_engines:
        import pytest
        pytest.skip("the residual add fuses into the conv only on onednn")
    torch.manual_seed(0)
    model = ResidualTail().eval()
    observed, _, x = _calibrated(model, (2, 3, 12, 12))
    qmodel = qcast.convert(observed)
    conv = qmodel.graph_module.get_submodule("conv")
    assert isinstance(conv, QConv) and conv.add and conv.float_out
    row = _rows(qmodel)["conv"]
    assert row.precision == "int8" and row.reason.endswith("fp32 output (no int8 op reads it); fused add+relu"), row
    with torch.no_grad():
        out, sim, ref = qmodel(x), to_qdq(observed)(x), model(x)
        assert torch.equal(qmodel(x), out)  # the residual operand's int8 buffer was not overwritten
    assert_sqnr(sqnr(sim, out), 60.0, "vs QDQ simulation")
    assert_sqnr(sqnr(ref, out), 35.0, "vs float")
    # the fp32-output flag round-trips through save/load
    qcast.save(qmodel, tmp_path / "m.qcast")
    loaded = qcast.load(tmp_path / "m.qcast")
    assert loaded.graph_module.get_submodule("conv").float_out
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
