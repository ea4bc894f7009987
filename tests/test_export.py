"""qcast.export: the QDQ graph as an engine's own file, run by that engine and compared with qcast's model."""
from __future__ import annotations

import pytest
import torch

import qcast
from qcast import UnsupportedError
from tests.helpers import sqnr


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=2),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 5)).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(2, 3, 12, 12, generator=g) for _ in range(4)]
    return model, qcast.quantize(model, calib, backend="torch", progress=False, check_speed=False)


def test_openvino_ir_runs_in_openvino_like_the_qdq_simulation(quantized, tmp_path):
    ov = pytest.importorskip("openvino")
    model, qmodel = quantized
    path = qcast.export(qmodel, tmp_path / "m.xml")
    assert (tmp_path / "m.bin").exists() and not list(tmp_path.glob(".qcast-export-*"))
    compiled = ov.Core().compile_model(ov.Core().read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    out = torch.from_numpy(compiled(x.numpy())[compiled.outputs[0]].copy())
    with torch.no_grad():
        sim, ref = qmodel.qcast_qdq(x), model(x)
    assert sqnr(sim, out) >= 35.0  # one 8-bit step flipped costs ~36-40 dB (tests/backends/test_openvino.py)
    assert sqnr(ref, out) >= sqnr(ref, qmodel(x)) - 1.0
    precisions = {op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
                  if op.get_rt_info()["layerType"].astype(str) in ("Convolution", "FullyConnected")}
    assert precisions == {"u8"}, precisions


def test_unknown_format_is_a_clear_error_and_loaded_models_export_the_same_file(quantized, tmp_path):
    _, qmodel = quantized
    with pytest.raises(UnsupportedError, match=r"'\.pt'.*\.onnx.*\.xml"):
        qcast.export(qmodel, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    pytest.importorskip("openvino")
    qcast.save(qmodel, tmp_path / "m.qcast")
    qcast.export(qmodel, tmp_path / "a.xml")
    qcast.export(qcast.load(tmp_path / "m.qcast", backend="torch"), tmp_path / "b.xml")
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()  # same weights, same qparams


def test_onnx_export_runs_in_onnxruntime_with_int8_kernels(quantized, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, qmodel = quantized
    path = qcast.export(qmodel, tmp_path / "m.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        sim, ref = qmodel.qcast_qdq(x), model(x)
    assert sqnr(sim, out) >= 30.0  # rounding flips between engines (tests/backends/test_onnxruntime.py)
    assert sqnr(ref, out) >= sqnr(ref, qmodel(x)) - 1.0
    import onnx
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops, ops  # both convs fused into int8 kernels


@pytest.mark.parametrize("suffix, engine", [(".onnx", "onnxruntime"), (".xml", "openvino")])
def test_export_refuses_an_op_the_engine_file_cannot_hold(tmp_path, suffix, engine):
    """An EmbeddingBag (Backend.torch_ops of both engines: their converters fail on torch.onnx's Loop) cannot go into
    one engine file: a clear error naming the layer and the fix, nothing written."""
    pytest.importorskip(engine)

    class Bags(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.fc = torch.nn.EmbeddingBag(60, 16, mode="sum"), torch.nn.Linear(16, 4)

        def forward(self, indices, offsets):
            return self.fc(self.bag(indices, offsets))

    data = [(torch.randint(0, 60, (20,)), torch.tensor([0, 4, 9, 15])) for _ in range(3)]
    q = qcast.quantize(Bags().eval(), data, backend="torch")
    with pytest.raises(UnsupportedError, match=r"\['bag'\] \(embedding_bag\).*qcast.save"):
        qcast.export(q, tmp_path / f"m{suffix}")
    assert list(tmp_path.iterdir()) == []
