"""Capture: untraceable regions, top-level control flow, stubs and torch.ao fused modules, structured outputs."""
from __future__ import annotations

import collections
import dataclasses
import textwrap

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.nn as nn
from torch.ao.quantization import DeQuantStub, QuantStub

import qcast
from qcast import CaptureError
from tests.helpers import assert_sqnr, leaf_sqnrs, quantize_small, quantize_zoo, same_structure, sqnr
from tests.models import OUTPUT_KINDS, UNTRACEABLE


# ------------------------------------------------------------------------------------------------
# untraceable submodules become float regions
# ------------------------------------------------------------------------------------------------
def test_untraceable_submodule_stays_float_and_is_explained():
    assert UNTRACEABLE["user_unet"] == ("gate",)
    model, qmodel, x = quantize_zoo("user_unet")
    rows = qcast.explain(qmodel)
    by_name = {r.name: r for r in rows}
    gate = by_name["gate"]
    assert gate.precision == "float" and gate.engine == "torch-float"
    assert "control flow" in gate.reason, gate.reason
    assert "if x.mean() > 0" in gate.reason, gate.reason  # points at the user's line
    for inner in ("gate.conv_pos", "gate.conv_neg"):
        assert by_name[inner].precision == "float" and "gate" in by_name[inner].reason
    others = [r for r in rows if r.op == "conv2d" and not r.name.startswith("gate")]
    assert len(others) == 9 and all(r.precision == "int8" for r in others), others
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) >= 23.0  # measured 25.6 dB (see test_zoo)


class Gate(nn.Module):
    """Picks a branch from the data: not traceable."""

    def __init__(self, c):
        super().__init__()
        self.pos = nn.Conv2d(c, c, 1)
        self.neg = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:
            return self.pos(x)
        return -self.neg(x)


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate(3)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.stem(self.gate(x))))


def test_float_region_keeps_its_data_dependent_behaviour():
    """The opaque region is called, not traced: each call still picks the branch its input asks for."""
    torch.manual_seed(0)
    model = GatedNet().eval()

    def item(g):  # calibrate on both branches
        return torch.randn(2, 3, 12, 12, generator=g) + (2.0 if torch.rand(1, generator=g) > 0.5 else -2.0)

    r = quantize_small(model, item)
    assert {row.name: row.precision for row in r.rows if row.op == "conv2d"} == {
        "gate.pos": "float", "gate.neg": "float", "stem": "int8", "head": "int8"}
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(model(x + 2.0), model.head(torch.relu(model.stem(-model.gate.neg(x + 2.0)))))
        for shift in (2.0, -2.0):  # one call per branch
            assert sqnr(model(x + shift), r.qmodel(x + shift)) >= 36.0  # measured 41.0 / 39.7 dB


class TopLevelBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow in the root forward
            return self.conv(x)
        return self.conv(-x)


def test_top_level_control_flow_is_a_capture_error():
    with pytest.raises(CaptureError) as e:
        qcast.quantize(TopLevelBranch().eval(), [torch.randn(1, 3, 8, 8)], progress=False)
    msg = str(e.value)
    assert "TopLevelBranch" in msg and "control flow" in msg
    assert "if x.sum() > 0" in msg  # the offending line
    assert "submodule" in msg  # and what to do about it


def test_user_code_in_a_folder_named_qcast_is_still_the_users(tmp_path, monkeypatch):
    """qcast's own frames are recognised by where the package is installed, not by '/qcast/' in a path: a user whose
    project lives in a folder called qcast (what `git clone` of this repository makes) still sees their own line."""
    home = tmp_path / "qcast" / "mymodels"
    home.mkdir(parents=True)
    (home / "branchy_net.py").write_text(textwrap.dedent("""
        import torch, torch.nn as nn

        class Gate(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 3, 1)

            def forward(self, x):
                if x.mean() > 0:  # the user's own data-dependent branch
                    return self.conv(x)
                return -x

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate, self.head = Gate(), nn.Conv2d(3, 4, 3)

            def forward(self, x):
                return self.head(self.gate(x))

        class Root(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)

            def forward(self, x):
                if x.sum() > 0:  # top-level branch
                    return self.conv(x)
                return self.conv(-x)
    """))
    monkeypatch.syspath_prepend(str(home))
    import branchy_net
    assert "/qcast/" in branchy_net.__file__.replace("\\", "/")
    qmodel = qcast.quantize(branchy_net.Net().eval(), [torch.randn(1, 3, 8, 8)], progress=False)
    gate = {r.name: r for r in qcast.explain(qmodel)}["gate"]
    assert "branchy_net.py" in gate.reason and "if x.mean() > 0" in gate.reason, gate.reason
    with pytest.raises(CaptureError, match="if x.sum\\(\\) > 0"):
        qcast.prepare(branchy_net.Root().eval(), torch.randn(1, 3, 8, 8))


def test_prepare_raises_the_same_capture_error():
    with pytest.raises(CaptureError):
        qcast.prepare(TopLevelBranch().eval(), torch.randn(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------
# leftovers of torch.ao eager-mode quantization
# ------------------------------------------------------------------------------------------------
class WithStubs(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.conv2(self.relu(self.conv1(self.quant(x)))))


def test_quant_stubs_are_identities():
    torch.manual_seed(0)
    r = quantize_small(WithStubs(), (2, 3, 12, 12))
    names = [row.name for row in r.rows]
    assert "quant" not in names and "dequant" not in names
    assert [(row.name, row.precision) for row in r.rows] == [("conv1", "int8"), ("conv2", "int8")]
    assert r.sqnr >= 34.0  # measured 36.9 dB


def test_zoo_stubs_are_not_reported():
    _, qmodel, _ = quantize_zoo("user_unet")
    assert not {"quant", "dequant"} & {r.name for r in qcast.explain(qmodel)}


def _ao_fused(kind):
    c = nn.Conv2d(4, 8, 3, padding=1)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    fused = {"ConvReLU2d": lambda: nni.ConvReLU2d(c, nn.ReLU()), "ConvBn2d": lambda: nni.ConvBn2d(c, bn),
             "ConvBnReLU2d": lambda: nni.ConvBnReLU2d(c, bn, nn.ReLU())}[kind]()
    return nn.Sequential(fused, nn.Conv2d(8, 4, 1))


# kind: (fused suffix expected in the reason, threshold dB)   measured SQNR
AO_FUSED = {"ConvReLU2d": ("relu", 35.0),       # 38.7
            "ConvBn2d": ("bn", 33.0),           # 36.5
            "ConvBnReLU2d": ("bn+relu", 34.0)}  # 36.9


@pytest.mark.parametrize("kind", list(AO_FUSED))
def test_torch_ao_fused_modules_are_their_float_equivalents(kind):
    suffix, threshold = AO_FUSED[kind]
    torch.manual_seed(0)
    r = quantize_small(_ao_fused(kind), (2, 4, 12, 12))
    rows = r.rows
    assert [row.op for row in rows] == ["conv2d", "conv2d"], rows
    assert all(row.precision == "int8" for row in rows)
    assert rows[0].name == "0.0" and rows[0].reason.endswith("fused " + suffix), rows[0]
    assert r.sqnr >= threshold, f"{kind}: {r.sqnr:.2f} dB"


def test_torch_ao_linear_relu_and_conv1d_relu():
    torch.manual_seed(0)
    r = quantize_small(nn.Sequential(nni.LinearReLU(nn.Linear(16, 32), nn.ReLU()), nn.Linear(32, 4)), (16, 16))
    assert [(row.op, row.precision) for row in r.rows] == [("linear", "int8"), ("linear", "int8")]
    assert "relu" in r.rows[0].reason
    assert r.sqnr >= 34.0  # measured 36.9 dB
    r = quantize_small(nn.Sequential(nni.ConvReLU1d(nn.Conv1d(4, 8, 3), nn.ReLU()), nn.Conv1d(8, 4, 1)), (2, 4, 20))
    assert [(row.op, row.precision) for row in r.rows] == [("conv1d", "int8"), ("conv1d", "int8")]
    assert r.sqnr >= 34.0  # measured 37.2 dB


# ------------------------------------------------------------------------------------------------
# structured outputs keep their type and keys
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["multitask_dict", "detector_dataclass", "blazeface", "blazeface_landm"])
def test_zoo_structured_outputs_are_preserved(name):
    model, qmodel, x = quantize_zoo(name)
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    same_structure(ref, out)
    kind = OUTPUT_KINDS[name]
    if kind == "dict":
        assert isinstance(out, dict) and list(out) == ["logits", "embedding"]
    elif kind == "dataclass":
        assert dataclasses.is_dataclass(out) and type(out).__name__ == "DetectionOutput"
    else:
        assert isinstance(out, tuple) and len(out) == (3 if name.endswith("landm") else 2)
    assert min(leaf_sqnrs(ref, out)) >= 32.0  # worst leaf measured 35.0 dB (blazeface); per-leaf thresholds in test_zoo


Pair = collections.namedtuple("Pair", "features logits")


class ManyOutputs(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        h = self.head(f)
        if self.kind == "namedtuple":
            return Pair(features=f, logits=h)
        if self.kind == "list":
            return [f, h]
        if self.kind == "nested":
            return {"a": (f, [h]), "b": {"c": h}}
        return f, h


@pytest.mark.parametrize("kind", ["tuple", "list", "namedtuple", "nested"])
def test_container_outputs_are_preserved(kind):
    torch.manual_seed(0)
    r = quantize_small(ManyOutputs(kind), (2, 3, 12, 12))
    same_structure(r.ref, r.out)
    if kind == "namedtuple":
        assert isinstance(r.out, Pair) and r.out._fields == ("features", "logits")
    assert r.sqnr >= 35.0  # measured 38.9 dB (worst leaf)


# ------------------------------------------------------------------------------------------------
# torch.nn.utils.parametrize layers
# ------------------------------------------------------------------------------------------------
def test_parametrized_layers_are_quantized_and_the_users_model_keeps_its_parametrizations(tmp_path):
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv2d(4, 8, 3)), nn.ReLU(), spectral_norm(nn.Conv2d(8, 4, 1))).eval()
    x = torch.randn(2, 4, 12, 12)
    with torch.no_grad():
        before = model(x)
    r = quantize_small(model, (2, 4, 12, 12))
    assert [(row.op, row.precision) for row in r.rows] == [("conv2d", "int8"), ("conv2d", "int8")], r.rows
    assert_sqnr(r.sqnr, 30.0, "weight_norm + spectral_norm convs")  # measured 33.6 dB
    # qcast evaluated the parametrizations on its private copy only
    assert parametrize.is_parametrized(model[0], "weight") and parametrize.is_parametrized(model[2], "weight")
    with torch.no_grad():
        assert torch.equal(model(x), before)
    qcast.save(r.qmodel, tmp_path / "p.qcast")  # plain layers now: loads without the float model
    with torch.no_grad():
        assert torch.equal(qcast.load(tmp_path / "p.qcast")(x), r.qmodel(x))


def test_input_label_pairs_without_input_fn_say_how_to_pick_the_input():
    """A DataLoader over (image, label) yields 2-item batches; calling the model with both is the usual first mistake."""
    from torch.utils.data import DataLoader, TensorDataset
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))), batch_size=4)
    with pytest.raises(qcast.InputError, match=r"\(Tensor\[4, 3, 8, 8\]:float32, Tensor\[4\]:int64\).*"
                                               r"input_fn=lambda batch: batch\[0\]"):
        qcast.quantize(model, loader, progress=False)
    qmodel = qcast.quantize(model, loader, input_fn=lambda batch: batch[0], progress=False, check_speed=False)
    assert all(r.precision == "int8" for r in qcast.explain(qmodel) if r.op == "conv2d")


def test_recurrent_layer_is_one_leaf_whose_tuple_value_is_unpacked():
    """fx keeps an nn.LSTM as one call_module node whose value is ``(out, (h, c))``; getitem nodes unpack it and the
    layer gets one explain() row."""
    from qcast.capture import capture

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(4, 8, num_layers=2), nn.Linear(8, 2)

        def forward(self, x):
            out, (h, c) = self.lstm(x)
            return self.fc(out + h[-1]), c

    model = Seq().eval()
    x = torch.randn(5, 3, 4)
    cap = capture(model, (x,), {})
    calls = [n for n in cap.gm.graph.nodes if n.op == "call_module" and n.target.startswith("lstm")]
    assert [n.target for n in calls] == ["lstm"] and calls[0].meta["qcast_op"] == "lstm"
    assert {u.target.__name__ for u in calls[0].users} == {"getitem"}
    q = qcast.quantize(model, [x], backend="torch")
    assert [r.name for r in qcast.explain(q) if r.op == "lstm"] == ["lstm"]
    same_structure(model(x), q(x))
    assert min(leaf_sqnrs(model(x), q(x))) >= 25.0
