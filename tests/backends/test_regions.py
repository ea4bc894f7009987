"""What an engine cannot take runs in torch between the parts it runs (``qcast/backends/regions.py``).

An uncaptured region (the user's own Python, here ``if x.mean() > 0``) would be traced once by an engine's converter
and frozen to the branch the example took. Each engine backend instead runs the captured stages before and after it,
and calls the region as Python on every input. The tests prove the branch is not frozen: inputs that take each side
of the ``if`` (seen by a hook on the region the quantized model calls) match the QDQ simulation, which calls the region
too, while the other branch's output is far from it. Ops an engine's converter lacks (``torch.logcumsumexp``,
``Tensor.median``) run in torch the same way. Oracle and thresholds as in test_openvino.py / test_onnxruntime.py: one-step
rounding flips between the engine and the simulation cost random-weight CNNs 34-46 dB.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

import qcast  # noqa: E402
from qcast.backends import regions  # noqa: E402
from tests.helpers import build_zoo, sqnr, zoo_calibration  # noqa: E402
from tests.test_capture import GatedNet  # noqa: E402

ENGINES = ("openvino", "onnxruntime")
#: per engine, SQNR (dB) of its output vs the QDQ simulation on the small models here (measured >= 43 dB: no flip)
SIM_THRESHOLD = 35.0


@pytest.fixture(autouse=True)
def on_the_engine(monkeypatch):
    """Every captured stage with int8 ops on the engine: ``convert`` times each against the QDQ simulation in torch and
    keeps the faster (``regions.stage_times``), and these models are small enough for either; the test of that
    choice sets the times itself."""
    monkeypatch.setattr(regions, "stage_times", lambda lowered, sub, args: (0.0, float("inf")))


def quantize(model, calib, backend):
    return qcast.quantize(model, calib, backend=backend, progress=False, check_speed=False)


def branches_seen(region: nn.Module) -> list[bool]:
    """Records, for each call of ``region``, whether its input's mean was > 0 (the side of the ``if`` it took)."""
    seen: list[bool] = []
    region.register_forward_pre_hook(lambda m, args: seen.append(bool(args[0].mean() > 0)))
    return seen


def gated_data():
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(2, 3, 12, 12, generator=g) + (2.0 if i % 2 else -2.0) for i in range(6)]
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    return calib, x


@pytest.mark.parametrize("engine", ENGINES)
def test_the_engine_runs_the_captured_parts_and_the_region_runs_in_torch_on_every_call(engine):
    torch.manual_seed(0)
    model = GatedNet().eval()
    calib, x = gated_data()
    qmodel = quantize(model, calib, engine)
    assert qmodel.qcast_meta["backend"] == engine
    kinds = [kind for _, kind, _ in qmodel.graph_module.qcast_stages]
    assert kinds == ["torch", "engine"]  # gate (in torch), then stem and head on the engine
    rows = {r.name: r for r in qcast.explain(qmodel)}
    assert rows["gate"].engine == "torch-float" and "between the " + engine in rows["gate"].reason
    assert "if x.mean() > 0" in rows["gate"].reason
    assert rows["stem"].engine.startswith(engine) and rows["stem"].precision == "int8"
    with torch.no_grad():
        sims = [qmodel.qcast_qdq(x + shift) for shift in (2.0, -2.0)]
        seen = branches_seen(qmodel.graph_module.gate)  # (the simulation calls the same module)
        for shift, sim in zip((2.0, -2.0), sims):
            out = qmodel(x + shift)
            assert sqnr(sim, out) >= SIM_THRESHOLD
            assert sqnr(model(x + shift), out) >= 36.0  # as test_capture on the torch backend
    assert seen == [True, False]  # each call took the side its own input asks for
    # the two sides differ: a frozen branch would have been caught above
    with torch.no_grad():
        assert sqnr(model.gate.pos(x + 2.0), -model.gate.neg(x + 2.0)) < 5.0


def gated_unet():
    """The zoo's UNet with its gate's input mean moved near zero (the BatchNorm before it shifted), so that the plain
    test input takes the ``x.mean() > 0`` side and the input + 3 the other; calibrated on both."""
    model, input_fn = build_zoo("user_unet")
    seen = []
    hook = model.gate.register_forward_pre_hook(lambda m, args: seen.append(float(args[0].mean())))
    calib = zoo_calibration(input_fn)
    with torch.no_grad():
        for c in calib:
            model(c)
        model.down2[1].bias -= sum(seen) / len(seen) - 0.015
    hook.remove()
    calib = [c + (3.0 if i % 2 else 0.0) for i, c in enumerate(calib)]
    return model, calib, input_fn(batch=2, seed=10_000)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_zoo_unet_runs_on_the_engine_with_its_gate_in_torch(engine):
    model, calib, x = gated_unet()
    qmodel = quantize(model, calib, engine)
    stages = qmodel.graph_module.qcast_stages
    assert [kind for _, kind, _ in stages] == ["engine", "torch", "engine"]
    rows = qcast.explain(qmodel)
    convs = [r for r in rows if r.op == "conv2d" and not r.name.startswith("gate")]
    assert len(convs) == 9 and all(r.engine.startswith(engine + ":") for r in convs), convs
    assert {r.engine for r in rows if r.name.startswith("gate")} == {"torch-float"}
    qdq = qmodel.qcast_qdq
    flip = qdq.gate.register_forward_hook(  # the simulation with the gate's other side: what a frozen trace would give
        lambda m, args, out: m.relu(m.conv_neg(args[0]) if args[0].mean() > 0 else m.conv_pos(args[0])))
    with torch.no_grad():
        frozen = [qdq(x), qdq(x + 3.0)]
    flip.remove()
    with torch.no_grad():
        sims = [qdq(x), qdq(x + 3.0)]
        seen = branches_seen(qmodel.graph_module.gate)  # (the simulation calls the same module)
        for xi, sim, other in zip((x, x + 3.0), sims, frozen):
            out = qmodel(xi)
            # measured (each side) 43.9 / 36.3 dB on openvino, 34.5 / 31.2 on onnxruntime (the torch backend:
            # 34.6 / 31.2, rounding flips in the int8 layers after the gate), against 0.4 / -0.5 dB for the other side
            assert sqnr(sim, out) >= 25.0
            assert sqnr(other, out) < 10.0
    assert seen == [True, False]


class Lacking(nn.Module):
    """Convs around two ops neither engine converts (OpenVINO 2026.4: no rule for aten::logcumsumexp, aten::median;
    torch.onnx.export at opset 17: neither)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.logcumsumexp(x, dim=-1) - x.median(dim=-1, keepdim=True).values
        return self.c2(x)


@pytest.mark.parametrize("engine", ENGINES)
def test_ops_the_engine_cannot_convert_run_in_torch_and_the_rest_on_the_engine(engine, tmp_path):
    torch.manual_seed(0)
    model = Lacking().eval()
    calib = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    qmodel = quantize(model, calib, engine)
    rows = {r.name: r for r in qcast.explain(qmodel)}
    assert rows["logcumsumexp"].engine == "torch-float"
    assert f"{engine} cannot convert aten::logcumsumexp" in rows["logcumsumexp"].reason
    assert rows["c1"].engine.startswith(engine) and rows["c2"].engine.startswith(engine)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert sqnr(qmodel.qcast_qdq(x), qmodel(x)) >= SIM_THRESHOLD
    with pytest.raises(qcast.UnsupportedError, match=r"cannot convert aten::(logcumsumexp|median)"):
        qcast.export(qmodel, tmp_path / ("m.onnx" if engine == "onnxruntime" else "m.xml"))


class Scaled(nn.Module):
    """The region returns a Python float the captured graph multiplies by: an engine stage cannot take it."""

    def forward(self, x):
        s = float(x.abs().mean())
        if s > 0:
            return x, s
        return x, 1.0


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.scaled, self.c2 = nn.Conv2d(3, 8, 3, padding=1), Scaled(), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y, s = self.scaled(torch.relu(self.c1(x)))
        return self.c2(y * s)


def test_auto_keeps_torch_with_the_reason_when_no_engine_can_split_the_model():
    torch.manual_seed(0)
    model = ScaledNet().eval()
    calib = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    for engine in ENGINES:
        with pytest.raises(qcast.UnsupportedError, match=r"'getitem_1' \(float.*crosses from one stage to the next"):
            quantize(model, calib, engine)
    qmodel = quantize(model, calib, "auto")
    assert qmodel.qcast_meta["backend"] == "torch"
    tried = {c["backend"]: c["rejected"] for c in qmodel.qcast_meta["backend_choice"]["candidates"]}
    assert all("only tensors between stages" in tried[e] for e in ENGINES), tried
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert sqnr(qmodel.qcast_qdq(x), qmodel(x)) >= SIM_THRESHOLD


def test_auto_runs_a_gated_model_on_the_fastest_agreeing_backend_with_both_branches():
    torch.manual_seed(0)
    model = GatedNet().eval()
    calib, x = gated_data()
    qmodel = quantize(model, calib, "auto")
    tried = {c["backend"]: c for c in qmodel.qcast_meta["backend_choice"]["candidates"]}
    assert not any(c["rejected"] for c in tried.values()), tried  # every engine takes it now
    assert qmodel.qcast_meta["backend"] == min(tried, key=lambda k: tried[k]["ms"])
    with torch.no_grad():
        for shift in (2.0, -2.0):
            assert sqnr(model(x + shift), qmodel(x + shift)) >= 30.0


@pytest.mark.parametrize("engine", ENGINES)
def test_other_input_shapes_on_a_split_model_compute_what_the_simulation_does(engine):
    """OpenVINO's stages take any batch and spatial size; ONNX Runtime's the calibration size with any batch, other
    sizes running on the torch backend (a warning says so). Either way, every shape agrees with the simulation."""
    torch.manual_seed(0)
    model = GatedNet().eval()
    calib, _ = gated_data()
    qmodel = quantize(model, calib, engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for shape in [(1, 3, 12, 12), (5, 3, 12, 12), (2, 3, 16, 20), (3, 3, 20, 8)]:
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
            for shift in (2.0, -2.0):
                with torch.no_grad():
                    out = qmodel(x + shift)
                assert out.shape == (shape[0], 4, *shape[2:])
                assert sqnr(qmodel.qcast_qdq(x + shift), out) >= SIM_THRESHOLD, (engine, shape, shift)
    on_torch = [w for w in caught if "on the torch backend" in str(w.message)]
    assert len(on_torch) == (1 if engine == "onnxruntime" else 0), [str(w.message) for w in caught]
    with pytest.raises(qcast.InputError, match="channels"):
        qmodel(torch.randn(1, 4, 12, 12))


def test_stages_run_in_order_and_each_reads_only_earlier_values():
    """Two regions in a row, a residual path around them and a float op between: every stage reads values computed
    before it (graph inputs, earlier stages), and the split model runs as the simulation does."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = GatedNet().gate, GatedNet().gate
            self.c1 = nn.Conv2d(3, 3, 3, padding=1)
            self.c2 = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = torch.relu(self.c1(x))
            z = torch.sigmoid(self.a(y))
            return self.c2(self.b(z) + y)

    torch.manual_seed(0)
    model = Twice().eval()
    calib, x = gated_data()
    qdq_model = quantize(model, calib, "openvino")
    split = qdq_model.graph_module
    done = set(n.name for n in qdq_model.qcast_qdq.graph.nodes if n.op == "placeholder")
    order = regions.stages(qdq_model.qcast_qdq, {n: "region" for n in regions.uncaptured(qdq_model.qcast_qdq)})
    for stage in order:
        assert {v.name for v in stage.inputs} <= done, stage
        done |= {n.name for n in stage.nodes}
    assert [s.kind for s in order] == ["engine", "torch", "float", "torch", "engine"]
    assert [k for _, k, _ in split.qcast_stages] == [s.kind for s in order]
    with torch.no_grad():
        for shift in (2.0, -2.0):
            assert sqnr(qdq_model.qcast_qdq(x + shift), qdq_model(x + shift)) >= SIM_THRESHOLD


def test_a_saved_split_model_loads_split_on_each_engine(tmp_path):
    """The file keeps the QDQ graph; ``load`` (given the float model, which holds the region's code) splits it again
    for whichever engine it lowers to."""
    torch.manual_seed(0)
    model = GatedNet().eval()
    calib, x = gated_data()
    qmodel = quantize(model, calib, "openvino")
    qcast.save(qmodel, tmp_path / "m.qcast")
    for engine in ENGINES:
        loaded = qcast.load(tmp_path / "m.qcast", model=model, backend=engine)
        assert [k for _, k, _ in loaded.graph_module.qcast_stages] == ["torch", "engine"]
        with torch.no_grad():
            for shift in (2.0, -2.0):
                assert sqnr(qmodel.qcast_qdq(x + shift), loaded(x + shift)) >= SIM_THRESHOLD


@pytest.mark.parametrize("engine", ENGINES)
def test_a_stage_that_ran_faster_as_the_simulation_stays_in_torch(engine, monkeypatch):
    """A small stage can run faster as the QDQ simulation in torch than through an engine call (docs/design.md): then
    it stays there, computing the simulation's values, and explain() gives both times."""
    monkeypatch.setattr(regions, "stage_times", lambda lowered, sub, args: (1.0, 0.5))
    torch.manual_seed(0)
    model = GatedNet().eval()
    calib, x = gated_data()
    qmodel = quantize(model, calib, engine)
    assert [k for _, k, _ in qmodel.graph_module.qcast_stages] == ["torch", "float"]
    stem = {r.name: r for r in qcast.explain(qmodel)}["stem"]
    assert (stem.precision, stem.engine) == ("float", "torch-float")
    assert "planned int8" in stem.reason and "0.500 vs 1.000 ms" in stem.reason
    with torch.no_grad():
        for shift in (2.0, -2.0):
            assert torch.equal(qmodel.qcast_qdq(x + shift), qmodel(x + shift))
