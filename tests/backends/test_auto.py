"""backend="auto" (the default outside this test-suite): every installed backend lowered, checked against the QDQ
simulation and timed on the first calibration batch; the fastest that agrees is kept, and the choice is recorded.

No test here asserts which backend wins (that is a measurement, docs/benchmarks.md); they assert that the choice is
one of the agreeing candidates, that it is the fastest of them as measured, that a disagreeing or failing backend is
rejected with its reason, and that the result is faithful to the float model.
"""
from __future__ import annotations

import pytest
import torch

import qcast
from qcast.backends import auto
from qcast.backends.auto import Candidate
from tests.backends.common import small_observed
from tests.helpers import build_zoo, leaf_sqnrs, sqnr, zoo_calibration

pytest.importorskip("openvino")


def test_the_default_backend_is_auto_unless_qcast_backend_says_otherwise(monkeypatch):
    monkeypatch.delenv("QCAST_BACKEND", raising=False)
    assert qcast.QuantConfig().backend == "auto"
    monkeypatch.setenv("QCAST_BACKEND", "openvino")
    assert qcast.QuantConfig().backend == "openvino"
    assert qcast.QuantConfig(backend="torch").backend == "torch"


@pytest.mark.parametrize("name", ["resnet18", "multitask_dict"])
def test_auto_keeps_the_fastest_agreeing_backend_and_records_every_candidate(name):
    model, input_fn = build_zoo(name)
    calib = zoo_calibration(input_fn)
    qmodel = qcast.quantize(model, calib, backend="auto", progress=False, check_speed=False)
    choice = qmodel.qcast_meta["backend_choice"]
    tried = {c["backend"]: c for c in choice["candidates"]}
    assert {"torch", "openvino"} <= set(tried)
    eligible = {k: c for k, c in tried.items() if not c["rejected"]}
    assert eligible and all(c["sqnr_vs_sim"] >= auto.MIN_SQNR for c in eligible.values())
    assert qmodel.qcast_meta["backend"] == min(eligible, key=lambda k: eligible[k]["ms"])
    assert choice["input"].startswith("(")  # the calibration batch it was measured on
    x = input_fn(batch=2, seed=10_000)
    reference = qcast.quantize(model, calib, backend="torch", progress=False, check_speed=False)
    with torch.no_grad():
        ref, out, out_torch = model(x), qmodel(x), reference(x)
    assert min(leaf_sqnrs(ref, out)) >= min(leaf_sqnrs(ref, out_torch)) - 1.0  # as faithful as the torch backend
    rows = qcast.explain(qmodel)
    engines = {r.engine for r in rows if r.op in ("conv2d", "linear")}
    prefix = "openvino" if qmodel.qcast_meta["backend"] == "openvino" else ""
    assert all(e.startswith(prefix) for e in engines), engines


def test_a_backend_that_disagrees_with_the_simulation_is_rejected_with_its_reason(monkeypatch):
    """A lowering that computes something else (here: the openvino result scaled by 1.5) never wins on speed."""
    from qcast.backends import get_backend
    real = get_backend("openvino")

    class Wrong(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **k):
            return self.inner(*a, **k) * 1.5

    broken = real.__class__(**{**real.__dict__, "lower": lambda *a: Wrong(real.lower(*a))})
    monkeypatch.setattr(auto, "candidates", lambda kernels: [get_backend("torch"), broken])
    model, input_fn = build_zoo("resnet18")
    qmodel = qcast.quantize(model, zoo_calibration(input_fn), backend="auto", progress=False, check_speed=False)
    assert qmodel.qcast_meta["backend"] == "torch"
    rejected = {c["backend"]: c for c in qmodel.qcast_meta["backend_choice"]["candidates"]}["openvino"]
    assert "differs from the QDQ simulation" in rejected["rejected"] and rejected["sqnr_vs_sim"] < auto.MIN_SQNR


def test_a_backend_that_cannot_lower_the_model_is_rejected_and_auto_still_works(monkeypatch):
    from qcast.backends import get_backend
    from qcast.errors import UnsupportedError
    real = get_backend("openvino")

    def fail(*a):
        raise UnsupportedError("this engine cannot take the model")

    monkeypatch.setattr(auto, "candidates", lambda kernels: [get_backend("torch"), real.__class__(
        **{**real.__dict__, "lower": fail})])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    qmodel = qcast.quantize(model, [torch.randn(2, 3, 8, 8) for _ in range(3)], backend="auto", progress=False,
                            check_speed=False)
    assert qmodel.qcast_meta["backend"] == "torch"
    tried = {c["backend"]: c for c in qmodel.qcast_meta["backend_choice"]["candidates"]}
    assert tried["openvino"]["rejected"] == "UnsupportedError: this engine cannot take the model"


def test_candidate_reprs_read_well():
    assert repr(Candidate("openvino", 1.25, 41.04)) == "Candidate(openvino, 1.250 ms, 41.0 dB vs simulation)"
    assert repr(Candidate("x", None, None, "UnsupportedError: no")) == "Candidate(x, rejected: UnsupportedError: no)"


def test_a_saved_auto_model_loads_as_the_torch_backend_runs_it(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    calib = [torch.randn(2, 3, 12, 12) for _ in range(3)]
    qmodel = qcast.quantize(model, calib, backend="auto", progress=False, check_speed=False)
    qcast.save(qmodel, tmp_path / "m.qcast")
    loaded = qcast.load(tmp_path / "m.qcast")
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        assert sqnr(qmodel(x), loaded(x)) >= 35.0  # the same QDQ graph on two engines (see test_openvino.py)


def test_a_model_with_an_uncaptured_region_keeps_its_branches_on_every_backend(tmp_path):
    """A region of the user's own Python (``if x.mean() > 0``) is called as Python on every input, on every backend:
    the engines run the captured parts around it (tests/backends/test_regions.py), and auto chooses among all three.
    One engine file cannot hold the region, so ``export`` refuses it, naming it."""
    from tests.test_capture import GatedNet
    torch.manual_seed(0)
    model = GatedNet().eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(2, 3, 12, 12, generator=g) + (2.0 if i % 2 else -2.0) for i in range(6)]
    qmodel = qcast.quantize(model, calib, backend="auto", progress=False, check_speed=False)
    tried = {c["backend"]: c["rejected"] for c in qmodel.qcast_meta["backend_choice"]["candidates"]}
    assert tried == {"torch": "", "openvino": "", "onnxruntime": ""}
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for shift in (2.0, -2.0):  # each call takes the branch its own input asks for
            assert sqnr(model(x + shift), qmodel(x + shift)) >= 30.0
    with pytest.raises(qcast.UnsupportedError, match=r"uncaptured region.*\['gate'\].*freeze"):
        qcast.export(qmodel, tmp_path / "m.onnx")


def test_when_every_backend_disagrees_auto_keeps_torch_and_warns(monkeypatch):
    """The agreement check can itself be what fails (a degenerate example input): torch, the reference executor, is
    kept with a warning naming every rejection, rather than failing the conversion."""
    monkeypatch.setattr(auto, "_agreement", lambda ref, out: 5.0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    with pytest.warns(UserWarning, match=r"every backend disagreed.*torch: output differs.*keeping torch"):
        qmodel = qcast.quantize(model, [torch.randn(2, 3, 8, 8) for _ in range(3)], backend="auto", progress=False,
                                check_speed=False)
    assert qmodel.qcast_meta["backend"] == "torch"


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_compare_reports_layers_and_the_engines_own_output(name):
    """qcast.compare on a model an engine runs as one compiled graph: per-layer figures replayed on the torch lowering
    of the same QDQ graph, the output SQNR measured on the engine's output, and the report says so."""
    pytest.importorskip(name)
    model, observed = small_observed()
    qmodel = qcast.convert(observed, backend=name)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    report = qcast.compare(model, qmodel, [x])
    on_torch = qcast.compare(model, qcast.convert(observed, backend="torch"), [x])
    assert {r.name for r in report.layers} == {r.name for r in on_torch.layers}
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert report.output_sqnr == pytest.approx(sqnr(ref, out), abs=0.01)  # the engine's output, not the replay's
    assert report.output_sqnr > 25 and name in report.note and name in report.table()
    assert on_torch.note == ""
