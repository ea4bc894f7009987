"""fold_constants: values computed only from parameters/buffers become constants the int8 kernels take."""
from __future__ import annotations

import torch
import torch.nn as nn

import qcast
from tests.helpers import assert_sqnr, quantize_small


class LayerScale(nn.Module):
    """ConvNeXt-style per-channel scale reshaped in forward, plus a scale kept as a log."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.log_shift = nn.Parameter(torch.randn(8) * 0.1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x)) * self.gamma.view(1, -1, 1, 1)
        y = y + torch.exp(self.log_shift).reshape(1, 8, 1, 1)
        return self.head(y)


def test_parameter_expressions_are_folded_and_their_ops_run_int8():
    torch.manual_seed(0)
    model = LayerScale().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = quantize_small(model, (2, 4, 12, 12))
    rows = {row.op: row for row in r.rows}
    for op in ("mul", "add"):
        assert rows[op].precision == "int8", rows[op]
        assert "constant" in rows[op].reason, rows[op]
    assert all(row.precision == "int8" for row in r.rows), [row for row in r.rows if row.precision != "int8"]
    assert_sqnr(r.sqnr, 41.0, "folded layer scale")  # measured 44.4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model changed"


def test_folded_constant_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    r = quantize_small(LayerScale(), (2, 4, 12, 12))
    qcast.save(r.qmodel, tmp_path / "m.qcast")
    with torch.no_grad():
        assert torch.equal(qcast.load(tmp_path / "m.qcast")(r.x), r.out)


def test_values_without_graph_inputs_are_not_folded():
    """``torch.randn`` in forward must stay a run-time op: folding it would freeze one random draw."""
    from qcast.passes import fold_constants

    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.randn(x.shape[-1]) * 0.0

    gm = torch.fx.symbolic_trace(Noisy())
    fold_constants(gm)
    assert any(n.op == "call_function" and n.target is torch.randn for n in gm.graph.nodes)


def test_torch_max_pool2d_builtin_runs_int8():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(torch.max_pool2d(torch.relu(self.conv(x)), 2, 2))

    torch.manual_seed(0)
    r = quantize_small(M(), (2, 4, 12, 12))
    pool = next(row for row in r.rows if row.op == "max_pool")
    assert pool.precision == "int8", pool
    assert_sqnr(r.sqnr, 33.0, "torch.max_pool2d")  # measured 36.2


def test_a_product_of_parameters_becomes_one_constant_operand():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)
            self.c = nn.Parameter(torch.rand(1, 8, 1, 1), requires_grad=False)
            self.head = nn.Conv2d(8, 8, 1)  # an int8 reader: without one the add would run in float (placement)

        def forward(self, x):
            return self.head(self.conv(x) + self.c * self.c)

    torch.manual_seed(0)
    observed = qcast.prepare(M().eval(), torch.randn(2, 4, 12, 12))
    plans = {n.meta["qcast_name"]: n.meta["qcast_plan"] for n in observed.gm.graph.nodes if "qcast_plan" in n.meta}
    assert "mul" not in {p.op for p in plans.values()}, plans
    assert plans["add"].precision == "int8" and "constant" in plans["add"].reason, plans["add"]
