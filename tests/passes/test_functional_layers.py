"""functional_layers: F.conv*/F.linear/x @ W with a model-owned weight run as the standard layer, int8, under the
name they were captured with; a weight computed at run time stays float and explain() says why."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcast
from qcast.capture import WEIGHTED_OPS
from tests.helpers import assert_sqnr, leaf_sqnrs, quantize_small
from tests.models.coverage import MODELS, RunTimeWeight

#: the explain() names each model's functional layers keep (module path of the owner + the op)
NAMES = {
    "functional_conv": ["c1:conv2d", "c2:conv2d", "conv2d"],
    "functional_mlp": ["linear", "linear#2", "linear#3"],
    "matmul_buffer": ["matmul", "matmul#2", "matmul#3"],
    "video": ["conv3d"],
}
#: measured on the torch backend (seed 0, 8 calibration batches; worst output): 35.6, 35.2, 35.7, 64.5 dB
FLOORS = {"functional_conv": 32.0, "functional_mlp": 32.0, "matmul_buffer": 32.0, "video": 60.0}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_functional_layers_run_int8_under_their_captured_names(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = quantize_small(model, shape, batches=8)
    rows = {row.name: row for row in r.rows}
    for n in NAMES[name]:
        assert rows[n].precision == "int8" and rows[n].op in WEIGHTED_OPS, rows[n]
    weighted = [row for row in r.rows if row.op in WEIGHTED_OPS]
    assert all(row.precision == "int8" for row in weighted), weighted
    assert_sqnr(min(leaf_sqnrs(r.ref, r.out)), FLOORS[name], name)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model changed"
    assert "conv2d" not in {row.op for row in r.rows if row.precision == "float" and row.op in WEIGHTED_OPS}


def test_seed_003_custom_layer_folds_bn_and_fuses_relu():
    build, shape = MODELS["functional_conv"]
    r = quantize_small(build(), shape)
    rows = {row.name: row for row in r.rows}
    assert "fused bn+relu" in rows["c1:conv2d"].reason, rows["c1:conv2d"]
    assert "fused relu" in rows["c2:conv2d"].reason, rows["c2:conv2d"]
    assert not any(row.op in ("batch_norm", "relu") for row in r.rows), r.rows


def test_a_weight_computed_at_run_time_stays_float_and_says_why():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    make = lambda g: (torch.randn(2, 4, 10, 10, generator=g), torch.randn(4, 4, 3, 3, generator=g) * 0.2)  # noqa: E731
    model = RunTimeWeight().eval()
    data = [make(g) for _ in range(4)]
    qmodel = qcast.quantize(model, data, progress=False, check_speed=False)
    rows = {row.name: row for row in qcast.explain(qmodel)}
    assert rows["conv"].precision == "int8", rows["conv"]
    assert rows["conv2d"].precision == "float" and "computed at run time" in rows["conv2d"].reason, rows["conv2d"]
    x = make(g)
    with torch.no_grad():
        assert_sqnr(leaf_sqnrs(model(*x), qmodel(*x))[0], 35.0, "run-time weight")  # measured 40+


def test_the_layer_holds_the_weight_once_and_the_graph_calls_it():
    """Unit: the pass turns the call into a call_module of nn.Conv2d / nn.Linear holding the model's own tensor
    (nothing else read it), keeps the node's qcast metadata, and leaves the owner without the moved attribute."""
    from qcast.capture import capture
    from qcast.passes import fold_constants, functional_layers

    build, shape = MODELS["functional_conv"]
    model = build()
    gm = capture(model, (torch.randn(*shape),), {}).gm
    names = {n.meta["qcast_name"] for n in gm.graph.nodes if n.op == "call_function"}
    fold_constants(gm)
    assert functional_layers(gm) == 3
    calls = {n.meta["qcast_name"]: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert {"c1:conv2d", "c2:conv2d", "conv2d"} <= set(calls) and {"c1:conv2d", "conv2d"} <= names
    assert isinstance(calls["c2:conv2d"], nn.Conv2d) and calls["c2:conv2d"].groups == 4
    assert calls["c2:conv2d"].stride == (2, 2)
    assert calls["c1:conv2d"].weight is model.c1.weight or torch.equal(calls["c1:conv2d"].weight, model.c1.weight)
    assert "proj" not in dict(gm.named_buffers())
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-6)


def test_settings_given_at_run_time_keep_the_call_float_with_the_reason():
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8) * 0.3)

        def forward(self, x):
            return F.linear(x, self.w, x.mean(dim=0)[:8] * 0)

    r = quantize_small(Dyn(), (4, 8))
    row = next(row for row in r.rows if row.op == "linear")
    assert row.precision == "float" and "bias is computed at run time" in row.reason, row


def test_a_functional_model_saves_and_loads_bit_for_bit(tmp_path):
    build, shape = MODELS["functional_mlp"]
    r = quantize_small(build(), shape)
    qcast.save(r.qmodel, tmp_path / "m.qcast")
    with torch.no_grad():
        assert torch.equal(qcast.load(tmp_path / "m.qcast", backend="torch")(r.x), r.out)


def test_functional_transposed_conv_runs_int8():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4, 4, 4) * 0.2)
            self.b = nn.Parameter(torch.randn(4) * 0.1)

        def forward(self, x):
            return F.conv_transpose2d(torch.relu(x), self.w, self.b, stride=2, padding=1)

    torch.manual_seed(0)
    r = quantize_small(Up(), (2, 8, 6, 6), batches=8)
    row = next(row for row in r.rows if row.op == "conv_transpose2d")
    assert row.name == "conv_transpose2d" and row.precision == "int8", row
    assert "written as F.conv_transpose2d" in row.reason and "per-tensor" in row.reason, row
    assert_sqnr(leaf_sqnrs(r.ref, r.out)[0], 35.0, "F.conv_transpose2d")
