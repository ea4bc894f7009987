"""Issue 13's layer families on every backend: functional conv/linear/matmul with model-owned weights, transposed
convs and 3-D convs, quantized for torch, OpenVINO and ONNX Runtime. Oracle: the float model (SQNR); explain() must
say int8 for what the engine runs int8 (read back from the engine) and give the reason for what it does not; an ONNX
export loads in ONNX Runtime with the conv/linears fused into its int8 kernels."""
from __future__ import annotations

import functools

import pytest
import torch

import qcast
from qcast.capture import WEIGHTED_OPS
from tests.helpers import assert_sqnr, leaf_sqnrs
from tests.models.coverage import MODELS

BACKENDS = ("torch", "openvino", "onnxruntime")
#: worst output's SQNR vs float, measured (seed 0, 8 calibration batches; torch / openvino / onnxruntime):
#: functional_conv 35.6 / 35.6 / 30.9, functional_mlp 35.2 / 35.2 / 35.2, matmul_buffer 35.7 / 35.7 / 35.7,
#: decoder 34.8 / 34.8 / 34.8, video 64.5 / 64.0 / 62.9 dB
FLOORS = {"functional_conv": 28.0, "functional_mlp": 32.0, "matmul_buffer": 32.0, "decoder": 31.0, "video": 58.0}
#: what each engine leaves in float, with the reason explain() must give (measured: OpenVINO 2026.4 compiles the
#: decoder's up2 (4x4, 8 -> 4 channels) and its ConvTranspose1d head in f32 (also with requantized outputs) and
#: renames the head after the model output; ONNX Runtime 1.32's CPU provider fuses no ConvTranspose)
FLOAT_ON = {
    ("openvino", "decoder"): {"up2": "OpenVINO compiled it in f32", "head": "unnamed weighted layers run as"},
    ("onnxruntime", "decoder"): {n: "float ConvTranspose" for n in ("up1", "up2", "head")},
}


def _engine(backend: str):
    if backend != "torch":
        pytest.importorskip(backend)


@functools.lru_cache(maxsize=None)
def quantized(name: str, backend: str):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(*shape, generator=g) for _ in range(8)]
    x = torch.randn(*shape, generator=g)
    qmodel = qcast.quantize(model, data, backend=backend, progress=False, check_speed=False)
    return model, qmodel, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_layer_family_runs_int8_close_to_float(name, backend):
    _engine(backend)
    model, qmodel, x = quantized(name, backend)
    with torch.no_grad():
        assert_sqnr(min(leaf_sqnrs(model(x), qmodel(x))), FLOORS[name], f"{name} on {backend}")
    rows = [r for r in qcast.explain(qmodel) if r.op in WEIGHTED_OPS]
    expected_float = FLOAT_ON.get((backend, name), {})
    assert rows and len(rows) >= 3, rows
    for r in rows:
        if r.name in expected_float:
            assert r.precision == "float" and expected_float[r.name] in r.reason, r
        else:
            assert r.precision == "int8", r
            if backend != "torch":
                assert r.engine.startswith(f"{backend}:"), r  # read back from the engine, not just planned


def test_onnx_export_of_the_new_layers_fuses_in_onnxruntime(tmp_path):
    """Functional convs, a functional linear and Conv3d in one exported file: ORT fuses each into QLinearConv /
    QGemm (its transposed convs stay float ConvTranspose: its CPU provider has no int8 one, see explain())."""
    ort = pytest.importorskip("onnxruntime")
    for name, want in (("functional_conv", {"QLinearConv": 3}), ("video", {"QLinearConv": 3, "QGemm": 1})):
        model, qmodel, x = quantized(name, "onnxruntime")  # planned for ORT: no fp32-output conv (Backend.float_out)
        path = qcast.export(qmodel, tmp_path / f"{name}.onnx")
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}.optimized.onnx")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        import onnx
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
        for op, count in want.items():
            assert ops.count(op) == count, (name, ops)
        assert "Conv" not in ops, (name, ops)
        with torch.no_grad():
            assert_sqnr(leaf_sqnrs(model(x), out)[0], FLOORS[name], f"{name} exported to ONNX")
