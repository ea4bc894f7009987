"""The openvino backend: the same QDQ graph as the torch backend, compiled by OpenVINO.

Oracle: the QDQ graph run in float (``to_qdq``), which is what both backends execute. OpenVINO's integer kernels
and the float simulation round the same values; where a value lands exactly on a rounding boundary they can
disagree by one step, and on these random-weight CNNs one such flip early in the network costs the output ~36-40 dB
(measured: the float simulation itself differs that much between batch 1 and batch 8, and the torch backend from
it as much). Hence a threshold of 35 dB against the simulation; most outputs are bit-for-bit (> 120 dB) and the
fidelity to the float model is the torch backend's within 0.3 dB.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util

import pytest
import torch

pytest.importorskip("openvino")

import qcast  # noqa: E402
from tests.backends.common import Small, assert_threads_agree, small_observed  # noqa: E402
from qcast.convert import to_qdq  # noqa: E402
from qcast.errors import InputError, UnsupportedError  # noqa: E402
from tests.helpers import (WEIGHTED_OPS, assert_sqnr, build_zoo, leaf_sqnrs, same_structure, sqnr,  # noqa: E402
                           zoo_calibration)

#: SQNR vs the QDQ simulation, measured (batch 1 / batch 8): resnet18 129.4 / 39.6, mobilenet_v2 142.2 / 142.5
SIM_THRESHOLD = 35.0
#: how much further from the float model than the torch backend the openvino backend may be (measured: <= 0.3 dB
#: either way on resnet18, mobilenet_v2, blazeface, multitask_dict, detector_dataclass)
FLOAT_MARGIN = 1.0
CNNS = ("resnet18", "mobilenet_v2")


@functools.lru_cache(maxsize=None)
def converted(name: str):
    """(float model, input_fn, QDQ graph, torch-backend model, openvino-backend model) from one calibration."""
    model, input_fn = build_zoo(name)
    data = zoo_calibration(input_fn)
    observed = qcast.prepare(model, data[0])
    qcast.calibrate(observed, data, progress=False)
    return model, input_fn, to_qdq(observed), qcast.convert(observed), qcast.convert(observed, backend="openvino")


@pytest.mark.parametrize("name", CNNS)
@pytest.mark.parametrize("batch", [1, 8])
def test_openvino_runs_the_qdq_graph(name, batch):
    model, input_fn, qdq, q_torch, q_ov = converted(name)
    x = input_fn(batch=batch, seed=10_000)
    with torch.no_grad():
        ref, sim, out_torch, out_ov = model(x), qdq(x), q_torch(x), q_ov(x)
    assert isinstance(out_ov, torch.Tensor) and out_ov.shape == ref.shape and out_ov.dtype == torch.float32
    assert_sqnr(sqnr(sim, out_ov), SIM_THRESHOLD, f"{name} batch {batch}: openvino vs QDQ simulation")
    assert sqnr(ref, out_ov) >= sqnr(ref, out_torch) - FLOAT_MARGIN, "openvino further from float than torch backend"


@pytest.mark.parametrize("name", CNNS)
def test_explain_reads_int8_convs_back_from_openvino(name):
    *_, q_torch, q_ov = converted(name)
    rows, torch_rows = qcast.explain(q_ov), qcast.explain(q_torch)
    assert [(r.name, r.op, r.precision) for r in rows] == [(r.name, r.op, r.precision) for r in torch_rows]
    weighted = [r for r in rows if r.op in WEIGHTED_OPS]
    assert weighted and all(r.precision == "int8" and r.engine in ("openvino:u8", "openvino:i8") for r in weighted), [
        r for r in weighted if r.engine not in ("openvino:u8", "openvino:i8")]
    assert all(r.engine.startswith("openvino") for r in rows)
    assert "backend=openvino" in repr(q_ov)


@pytest.mark.parametrize("name", CNNS)
def test_residual_adds_run_inside_the_convs(name):
    """Every residual add runs fused into its conv, as in NNCF's model: with snippets on, OpenVINO's CPU plugin ran the
    add + FakeQuantize of every identity shortcut as an eltwise ``Subgraph`` of its own (u8), after a conv that wrote
    its output in f32 (module docstring of qcast.backends.openvino)."""
    from qcast.backends.openvino import CONV_ADD_CONFIG
    from qcast.nn import FusedConv

    model, input_fn, qdq, q_torch, q_ov = converted(name)
    assert any(isinstance(m, FusedConv) and m.add for m in qdq.modules()), f"{name}: no conv with a fused add"
    x = input_fn(batch=2, seed=10_001)
    with torch.no_grad():
        assert_sqnr(sqnr(qdq(x), q_ov(x)), SIM_THRESHOLD, f"{name}: openvino vs QDQ simulation")
    ov_module = q_ov.graph_module
    assert all(ov_module._settings[k] == v for k, v in CONV_ADD_CONFIG.items())
    for compiled, _ in [*ov_module._static.values(), (ov_module.compiled, None)]:
        layers = [(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                  for op in compiled.get_runtime_model().get_ordered_ops()]
        assert ("Subgraph", "u8") not in layers and not any(kind == "Eltwise" for kind, _ in layers), layers


def test_graphs_without_a_fused_add_keep_openvinos_default_snippets():
    from qcast.backends.openvino import CONV_ADD_CONFIG, settings

    _, observed = _small(None)
    config = settings(to_qdq(observed), 2)
    assert not set(CONV_ADD_CONFIG) & set(config) and config["INFERENCE_NUM_THREADS"] == 2


@pytest.mark.parametrize("name", ["multitask_dict", "detector_dataclass"])
def test_quantize_with_openvino_keeps_the_output_structure(name):
    model, input_fn = build_zoo(name)
    data = zoo_calibration(input_fn)
    q_ov = qcast.quantize(model, data, backend="openvino", progress=False)
    q_torch = qcast.quantize(model, data, progress=False)
    x = input_fn(batch=3, seed=10_000)
    with torch.no_grad():
        ref, out, out_torch = model(x), q_ov(x), q_torch(x)
    same_structure(ref, out)
    for s_ov, s_torch in zip(leaf_sqnrs(ref, out), leaf_sqnrs(ref, out_torch)):
        assert s_ov >= s_torch - FLOAT_MARGIN, (s_ov, s_torch)



def _small(config=None):
    return small_observed(config)


def test_fewer_weight_bits_and_a_float_layer():
    """4-bit weights (grid [-7, 7] stored in int8) and a layer kept in float both run as the simulation says."""
    _, observed = _small(qcast.QuantConfig(weight_bits=4, rounding="nearest", skip=["conv3"]))
    q_ov = qcast.convert(observed, backend="openvino")
    qdq = to_qdq(observed)
    x = torch.randn(8, 3, 20, 24, generator=torch.Generator().manual_seed(1))  # another batch and resolution
    with torch.no_grad():
        assert_sqnr(sqnr(qdq(x), q_ov(x)), SIM_THRESHOLD, "4-bit weights: openvino vs QDQ simulation")
    rows = {r.name: r for r in qcast.explain(q_ov)}
    assert rows["conv3"].precision == "float" and rows["conv3"].engine == "openvino:f32", rows["conv3"]
    assert rows["conv1"].engine in ("openvino:u8", "openvino:i8"), rows["conv1"]


def test_wrong_input_names_the_expected_shape():
    """A shape the compiled model does not take goes to the torch backend (once lowered, with a warning naming the
    engine's shape), which names what truly does not fit: here the channels."""
    _, observed = _small(None)
    q_ov = qcast.convert(observed, backend="openvino")
    with pytest.warns(UserWarning, match=r"\[\?,3,\?,\?\].*torch backend"):
        with pytest.raises(InputError, match="expects 3 input channels"):
            q_ov(torch.randn(1, 4, 16, 16))
    with pytest.raises(InputError):
        q_ov(torch.randn(1, 3, 16, 16), torch.randn(1))


def test_each_new_input_shape_gets_a_static_compile_up_to_a_bound():
    """OpenVINO runs a known shape faster (docs/design.md): the first MAX_STATIC shapes get a static-shape compile of
    their own, later ones run on the dynamic one; every shape computes what the QDQ simulation says."""
    _, observed = _small(None)
    q_ov, qdq = qcast.convert(observed, backend="openvino"), to_qdq(observed)
    ov_module = q_ov.graph_module
    # lowering compiled the calibration shape (what auto times) besides the dynamic one (what explain() reads back)
    calibration = list(ov_module._static)
    assert len(calibration) == 1, calibration
    shapes = [(b, 3, 16 + 4 * (b % 2), 16) for b in range(1, ov_module.MAX_STATIC + 3)]
    for shape in shapes:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.no_grad():
            assert_sqnr(sqnr(qdq(x), q_ov(x)), SIM_THRESHOLD, f"openvino at {shape} vs QDQ simulation")
    new = [(s,) for s in shapes if (s,) not in calibration]
    assert list(ov_module._static) == calibration + new[:ov_module.MAX_STATIC - 1]


def test_calls_from_several_threads_agree():
    _, observed = _small(None)
    q_ov = qcast.convert(observed, backend="openvino")
    assert_threads_agree(q_ov)


def test_save_keeps_the_qdq_graph_and_load_lowers_it_for_the_backend_asked(tmp_path):
    """A file is backend-neutral: saved from the openvino backend, it loads on torch bit-identical to converting the
    same calibration for torch, and on openvino as the openvino conversion runs."""
    _, observed = _small(None)
    q_ov, q_torch = qcast.convert(observed, backend="openvino"), qcast.convert(observed, backend="torch")
    qcast.save(q_ov, tmp_path / "m.qcast")
    on_torch = qcast.load(tmp_path / "m.qcast", backend="torch")
    on_ov = qcast.load(tmp_path / "m.qcast", backend="openvino")
    assert on_torch.qcast_meta["backend"] == "torch" and on_ov.qcast_meta["backend"] == "openvino"
    assert qcast.explain(on_torch) == qcast.explain(q_torch) and qcast.explain(on_ov) == qcast.explain(q_ov)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(on_torch(x), q_torch(x)) and torch.equal(on_ov(x), q_ov(x))


def test_missing_openvino_names_the_pip_command(monkeypatch):
    _, observed = _small(None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(UnsupportedError, match=r'pip install "qcast\[openvino\]"'):
        qcast.convert(observed, backend="openvino")
    with pytest.raises(UnsupportedError, match=r'pip install "qcast\[openvino\]"'):
        qcast.prepare(Small().eval(), torch.randn(1, 3, 16, 16), qcast.QuantConfig(backend="openvino"))
    assert isinstance(qcast.convert(observed), qcast.QuantizedModel)  # the torch backend needs nothing


def test_unknown_backend_lists_the_known_ones():
    _, observed = _small(None)
    with pytest.raises(UnsupportedError, match="openvino"):
        qcast.convert(observed, backend="tensorrt")


def test_backend_entries_read_well():
    from qcast.backends import backend_names, get_backend

    assert {"torch", "openvino"} <= set(backend_names())
    ov = get_backend("openvino")
    assert ov.available() and dataclasses.is_dataclass(ov)
    assert repr(ov) == ("Backend(name='openvino', requires='openvino', install_hint='pip install \"qcast[openvino]\"', "
                        "kernels='torch', conv_add=True, traces=True, float_out=True, weight_only=('linear:dynamic',), "
                        "torch_ops=('embedding_bag',))")
