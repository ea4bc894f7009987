"""The onnxruntime backend: the QDQ graph as canonical QDQ ONNX, run by ONNX Runtime's int8 kernels.

Oracle: the QDQ graph run in float (``to_qdq``). ORT's QLinearConv/QGemm round the same values as the simulation,
but where a value lands on a rounding boundary they disagree by one step, and on these random-weight CNNs one such
flip early in the network costs the output ~36-40 dB. Here they are not rare: even ORT with every optimization
off (float Conv on the dequantized values, only the summation order differs) is 36.8 dB from the simulation on the
zoo ResNet-18, and the simulation itself is 40 dB from itself between batch 1 and batch 8. Measured, ORT vs the
simulation (batch 1 / 8): resnet18 34.1 / 34.4, mobilenet_v2 41.4 / 40.7, blazeface 37.5 / 37.6 (boxes). Hence
30 dB; the fidelity to the float model is the torch backend's within 1 dB (measured: within 0.5 dB).
"""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

pytest.importorskip("onnxruntime")

import qcast  # noqa: E402
from tests.backends.common import Small, assert_threads_agree, small_observed  # noqa: E402
from qcast.backends.onnxruntime import FUSED_WEIGHTED, export_qdq_onnx, fused_layers, optimized_session  # noqa: E402
from qcast.backends.onnxruntime.export import to_onnx  # noqa: E402
from qcast.convert import example_call, int8_layers, to_qdq  # noqa: E402
from qcast.errors import InputError, UnsupportedError  # noqa: E402
from tests.helpers import (WEIGHTED_OPS, assert_sqnr, build_zoo, leaf_sqnrs, same_structure, sqnr,  # noqa: E402
                           zoo_calibration)

SIM_THRESHOLD = 30.0
FLOAT_MARGIN = 1.0
MODELS = ("resnet18", "mobilenet_v2", "blazeface")
ORT = qcast.QuantConfig(backend="onnxruntime")


@functools.lru_cache(maxsize=None)
def converted(name: str):
    """(float model, input_fn, QDQ graph, torch-backend model, onnxruntime-backend model) from one calibration."""
    model, input_fn = build_zoo(name)
    data = zoo_calibration(input_fn)
    observed = qcast.prepare(model, data[0], ORT)
    qcast.calibrate(observed, data, progress=False)
    return (model, input_fn, to_qdq(observed), qcast.convert(observed, backend="torch"),
            qcast.convert(observed, backend="onnxruntime"))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 8])
def test_onnxruntime_runs_the_qdq_graph(name, batch):
    model, input_fn, qdq, q_torch, q_ort = converted(name)
    # at batch 1, four images: one image's gap between two int8 executors swings with its rounding flips (MobileNetV2,
    # AMD EPYC: ONNX Runtime 0.2-1.2 dB under the torch backend over six images, -0.6 on one, 0.6 on the mean)
    ort_db, torch_db = [], []
    for i in range(4 if batch == 1 else 1):
        x = input_fn(batch=batch, seed=10_000 + i)
        with torch.no_grad():
            ref, sim, out_torch, out = model(x), qdq(x), q_torch(x), q_ort(x)
        same_structure(ref, out)
        for s_sim in leaf_sqnrs(sim, out):
            assert_sqnr(s_sim, SIM_THRESHOLD, f"{name} batch {batch}: onnxruntime vs QDQ simulation")
        ort_db.append(leaf_sqnrs(ref, out))
        torch_db.append(leaf_sqnrs(ref, out_torch))
    for leaf in range(len(ort_db[0])):
        s_ort = sum(d[leaf] for d in ort_db) / len(ort_db)
        s_torch = sum(d[leaf] for d in torch_db) / len(torch_db)
        assert s_ort >= s_torch - FLOAT_MARGIN, f"onnxruntime {s_ort:.2f} dB from float, torch backend {s_torch:.2f}"


@pytest.mark.parametrize("name", MODELS)
def test_every_int8_conv_and_linear_is_fused_by_onnxruntime(name):
    """Planned for ONNX Runtime, ORT's optimized model runs every int8 conv/linear as one of its int8 kernels
    (QLinearConv, QGemm...): a conv that no int8 op reads (BlazeFace's four heads) keeps its requantized output,
    since ORT has no QLinearConv with a float output (``Backend.float_out``), and explain() says so."""
    _, _, qdq, q_torch, q_ort = converted(name)
    _, optimized = optimized_session(to_onnx(qdq, *example_call(qdq)).model.SerializeToString(), 1)
    fused = {path for path, op in fused_layers(optimized).items() if op in FUSED_WEIGHTED}
    layers = int8_layers(qdq)
    paths = {id(m): path for path, m in qdq.named_modules()}
    planned = {paths[id(m)] for m in layers.values()}
    assert fused == planned, (sorted(planned - fused), sorted(fused - planned))
    kinds = [n.op_type for n in optimized.graph.node]
    assert kinds.count("QLinearConv") + kinds.count("QGemm") == len(layers)
    plans = {n.target: n.meta["qcast_plan"] for n in qdq.graph.nodes if n.op == "call_module" and n.target in layers}
    assert not any(p.float_out for p in plans.values() if p.op != "linear")
    heads = [t for t, p in plans.items() if "dequantized after it" in p.reason]
    assert name != "blazeface" or len(heads) == 4, heads
    rows, torch_rows = qcast.explain(q_ort), qcast.explain(q_torch)
    assert [(r.name, r.op, r.precision) for r in rows] == [(r.name, r.op, r.precision) for r in torch_rows]
    weighted = [r for r in rows if r.op in WEIGHTED_OPS]
    assert weighted and all(r.engine in ("onnxruntime:QLinearConv", "onnxruntime:QGemm") for r in weighted), weighted
    assert all("no fp32-output int8 conv2d" in {r.name: r for r in rows}[h].reason for h in heads)
    assert "backend=onnxruntime" in repr(q_ort)


def test_an_fp32_output_conv_planned_for_torch_runs_as_float_conv():
    """Planned for the torch backend (as ``backend='auto'`` plans), a conv no int8 op reads writes fp32 (placement,
    docs/design.md): ORT has no int8 conv with a float output, so it runs those (BlazeFace's four heads) as float
    Conv, and explain() says so."""
    model, input_fn = build_zoo("blazeface")
    data = zoo_calibration(input_fn, n=2)
    observed = qcast.prepare(model, data[0])
    qcast.calibrate(observed, data, progress=False)
    q_ort = qcast.convert(observed, backend="onnxruntime")
    fp32_convs = {n.meta["qcast_name"] for n in q_ort.qcast_qdq.graph.nodes if n.op == "call_module"
                  and n.meta.get("qcast_plan") is not None and n.meta["qcast_plan"].float_out}
    assert len(fp32_convs) == 4
    rows = {r.name: r for r in qcast.explain(q_ort)}
    for target in fp32_convs:
        assert rows[target].precision == "float" and "float Conv" in rows[target].reason, rows[target]
    x = input_fn(batch=2, seed=10_000)
    with torch.no_grad():
        for s in leaf_sqnrs(q_ort.qcast_qdq(x), q_ort(x)):
            assert_sqnr(s, SIM_THRESHOLD, "blazeface planned for torch, on onnxruntime, vs QDQ simulation")


def test_a_residual_add_fused_into_the_conv_is_reported_float():
    """Prepared for the torch backend, a conv + residual add is one op; ORT has no int8 kernel for it, so it runs
    that conv in float, and explain() says so and how to avoid it."""
    model, input_fn = build_zoo("resnet18")
    data = zoo_calibration(input_fn, n=2)
    observed = qcast.prepare(model, data[0])
    qcast.calibrate(observed, data, progress=False)
    rows = {r.name: r for r in qcast.explain(qcast.convert(observed, backend="onnxruntime"))}
    conv2 = rows["layer1.0.conv2"]
    assert conv2.precision == "float" and conv2.engine.split(":")[-1] in ("Conv", "FusedConv", "NchwcConv"), conv2
    assert "QuantConfig(backend='onnxruntime')" in rows["layer1.0.conv2"].reason
    assert rows["layer1.0.conv1"].engine == "onnxruntime:QLinearConv"


@pytest.mark.parametrize("name", ["multitask_dict", "detector_dataclass"])
def test_quantize_with_onnxruntime_keeps_the_output_structure(name):
    model, input_fn = build_zoo(name)
    data = zoo_calibration(input_fn)
    q_ort = qcast.quantize(model, data, backend="onnxruntime", progress=False)
    q_torch = qcast.quantize(model, data, config=ORT, progress=False)
    x = input_fn(batch=3, seed=10_000)
    with torch.no_grad():
        ref, out, out_torch = model(x), q_ort(x), q_torch(x)
    same_structure(ref, out)
    for s_ort, s_torch in zip(leaf_sqnrs(ref, out), leaf_sqnrs(ref, out_torch)):
        assert s_ort >= s_torch - FLOAT_MARGIN, (s_ort, s_torch)


def test_export_qdq_onnx_writes_a_canonical_model_a_fresh_session_runs(tmp_path):
    import onnx
    import onnxruntime as ort

    _, input_fn, qdq, _, q_ort = converted("resnet18")
    path = export_qdq_onnx(qdq, example_call(qdq)[0], tmp_path / "resnet18.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in nodes), "a Q left on a weight"
    for n in (n for n in nodes if n.op_type in ("Conv", "Gemm")):
        w_dq, b_dq = (next(d for d in nodes if d.output[0] == n.input[i]) for i in (1, 2))
        assert w_dq.op_type == b_dq.op_type == "DequantizeLinear", n.name
        assert inits[w_dq.input[0]].data_type == onnx.TensorProto.INT8, n.name
        assert inits[b_dq.input[0]].data_type == onnx.TensorProto.INT32, n.name
    dq_outputs = [n.output[0] for n in nodes if n.op_type == "DequantizeLinear"]
    assert all(sum(list(n.input).count(o) for n in nodes) <= 1 for o in dq_outputs), "a DQ with several consumers"
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = input_fn(batch=5, seed=10_001)  # another batch size than the example
    out = torch.from_numpy(session.run(None, {"input0": x.numpy()})[0])
    with torch.no_grad():
        assert_sqnr(sqnr(qdq(x), out), SIM_THRESHOLD, "exported file vs QDQ simulation")
        assert torch.equal(out, q_ort(x)), "the file and the backend's session differ"



def _small(config=ORT):
    return small_observed(config)


def test_a_float_layer_and_another_batch_size():
    _, observed = _small(qcast.QuantConfig(backend="onnxruntime", skip=["conv3"]))
    q_ort = qcast.convert(observed, backend="onnxruntime")
    qdq = to_qdq(observed)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_sqnr(sqnr(qdq(x), q_ort(x)), SIM_THRESHOLD, "skip=conv3: onnxruntime vs QDQ simulation")
    rows = {r.name: r for r in qcast.explain(q_ort)}
    assert rows["conv3"].precision == "float" and rows["conv3"].engine.startswith("onnxruntime"), rows["conv3"]
    assert rows["conv1"].engine == "onnxruntime:QLinearConv", rows["conv1"]


def test_other_shapes_run_on_torch_and_wrong_ones_are_named():
    """ORT's session takes the calibration shape with a free batch (docs/design.md); another resolution runs on the torch
    backend (lowered once, a warning names the session's shape), so the model takes what the float model takes; a
    wrong channel count or rank is still an InputError naming it."""
    model, observed = _small()
    q_ort, qdq = qcast.convert(observed, backend="onnxruntime"), to_qdq(observed)
    x = torch.randn(1, 3, 20, 24)
    with pytest.warns(UserWarning, match=r"\[\?,3,16,16\].*torch backend"):
        out = q_ort(x)
    with torch.no_grad():
        assert_sqnr(sqnr(qdq(x), out), SIM_THRESHOLD, "another resolution, on the torch backend, vs simulation")
    with pytest.raises(InputError, match="expects 3 input channels"):
        q_ort(torch.randn(1, 4, 16, 16))
    with pytest.raises(InputError):
        q_ort(torch.randn(1, 3, 16))
    with pytest.raises(InputError):
        q_ort(torch.randn(1, 3, 16, 16), torch.randn(1))


def test_calls_from_several_threads_agree():
    _, observed = _small()
    q_ort = qcast.convert(observed, backend="onnxruntime")
    assert_threads_agree(q_ort)


def test_a_saved_model_loads_back_on_onnxruntime(tmp_path):
    _, observed = _small()
    q_ort = qcast.convert(observed, backend="onnxruntime")
    qcast.save(q_ort, tmp_path / "m.qcast")
    loaded = qcast.load(tmp_path / "m.qcast", backend="onnxruntime")
    assert loaded.qcast_meta["backend"] == "onnxruntime" and qcast.explain(loaded) == qcast.explain(q_ort)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), q_ort(x))


def test_missing_onnxruntime_names_the_pip_command(monkeypatch):
    _, observed = _small(None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(UnsupportedError, match=r'pip install "qcast\[onnxruntime\]"'):
        qcast.convert(observed, backend="onnxruntime")
    with pytest.raises(UnsupportedError, match=r'pip install "qcast\[onnxruntime\]"'):
        qcast.prepare(Small().eval(), torch.randn(1, 3, 16, 16), ORT)
    assert isinstance(qcast.convert(observed), qcast.QuantizedModel)  # the torch backend needs nothing


def test_backend_entry_reads_well():
    from qcast.backends import get_backend

    entry = get_backend("onnxruntime")
    assert repr(entry) == ("Backend(name='onnxruntime', requires='onnxruntime', install_hint='pip install "
                           "\"qcast[onnxruntime]\"', kernels='torch', conv_add=False, traces=True, "
                           "float_out=('linear',), weight_only=(), torch_ops=('embedding_bag',))")
    assert get_backend("torch").conv_add and not get_backend("torch").traces
    assert get_backend("torch").writes_float("conv2d")
    assert entry.writes_float("linear") and not entry.writes_float("conv2d")
