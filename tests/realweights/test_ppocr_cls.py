"""Real weights, real photos: PaddleOCR's text-direction classifier (MobileNetV3-small x0.35: depthwise 3x3/5x5,
hardswish, squeeze-excite, residual adds), weights from the rapidocr-onnxruntime wheel, on the text lines of a
photographed book page (``skimage.data.page()``) and text drawn onto real photos (``tests/models/realtasks.py``).

Measured with the default config (8 calibration batches of 32 drawn lines; 1096 held-out lines; float accuracy
92.15%; one thread, as the suite runs): qcast 90.33% (drop 1.82 pp), top-1 agreement 95.44% (all 1096 predictions
count as confident: a 2-class softmax always has p >= 0.5; 100% of the 865 with p >= 0.9), KL 0.0124, logits SQNR
22.0 dB; PyTorch FX default PTQ: 90.05%, 92.24%, KL 0.0699, 14.0 dB. ``python benchmarks/accuracy.py`` puts ONNX
Runtime and OpenVINO+NNCF beside them (docs/accuracy.md): no engine reaches issue 3's 99% / 0.3 pp here (NNCF:
96.17%, 0.91 pp, KL 0.0093; ONNX Runtime: 95.26%, 1.28 pp, KL 0.0160). With only the weights int8 (every activation QDQ point removed from qcast's QDQ simulation) the
model keeps 99.36% (drop 0.27 pp, KL 0.0004), and removing any one kind of activation point (all conv outputs, all
hardswish outputs, the squeeze-excite gates, ...) recovered at most 1 point (on a 2150-line variant of this
set): the loss is 8-bit activation rounding spread over the ~100 quantized tensors of an 8-to-200-channel
network, on a task where many lines sit near p = 0.5. Guards below: SQNR 3 dB under the measured value, agreement and drop 1 point (11 lines) from it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qcast
from tests.models import realtasks

_why = realtasks.available("ppocr_cls")
if _why:
    pytest.skip(f"optional real-weight model: {_why} (make test installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def run():
    task = realtasks.load_task("ppocr_cls")
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    qmodel = qcast.quantize(task.model, task.calibration, progress=False)
    fx = realtasks.fx_default_ptq(task.model, task.calibration)
    lf = realtasks.logits(task.model, task.x)
    lq = realtasks.logits(qmodel, task.x)
    with realtasks.fx_engine():
        lfx = realtasks.logits(fx, task.x)
    return dict(task=task, before=before, qmodel=qmodel, q=realtasks.metrics(lf, lq, task.y),
                fx=realtasks.metrics(lf, lfx, task.y))


def test_rebuilt_network_matches_the_onnx_file_run_by_onnx_runtime(run):
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the original file as the reference")
    from tests.models import ppocr_cls

    x = run["task"].x[::200]
    session = ort.InferenceSession(ppocr_cls.onnx_path(), providers=["CPUExecutionProvider"])
    ref = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]  # the ONNX graph ends in a softmax
    with torch.no_grad():
        ours = torch.softmax(run["task"].model(x), 1).numpy()
    assert np.abs(ours - ref).max() < 1e-5, np.abs(ours - ref).max()  # measured 4e-7


def test_the_float_model_reads_the_photographed_text(run):
    m = run["q"]
    assert m.acc_float > 88.0, m  # measured 92.15%: real weights doing their job (chance is 50%)


def test_int8_output_kl_is_lower_than_pytorch_fx_default_ptq(run):
    assert run["q"].kl < run["fx"].kl, (run["q"], run["fx"])  # measured 0.0124 vs 0.0699
    assert run["q"].agreement > run["fx"].agreement, (run["q"], run["fx"])  # 95.44% vs 92.24%


def test_int8_keeps_the_float_models_predictions(run):
    m = run["q"]
    assert m.sqnr >= 19.0, m  # measured 22.0 dB
    assert m.agreement_90 >= 99.5, m  # measured 100% of the 865 predictions with p >= 0.9
    assert m.agreement >= 94.4, m  # measured 95.44% (every prediction of a 2-class model counts as confident)
    assert m.drop_pp <= 2.8, m  # measured 1.82 pp


@pytest.mark.xfail(strict=True, reason="issue 3's targets are not met on this model: measured agreement 95.44%, "
                   "drop 1.82 pp (OpenVINO+NNCF: 96.17%, 0.91 pp); see the module docstring")
def test_issue3_targets_agreement_99_and_drop_0_3pp(run):
    m = run["q"]
    assert m.agreement >= 99.0 and m.drop_pp <= 0.3, m


def test_every_conv_and_linear_is_int8_and_the_users_model_is_untouched(run):
    rows = qcast.explain(run["qmodel"])
    layers = [r for r in rows if r.op in ("conv2d", "linear")]
    assert len(layers) == 54 and all(r.precision == "int8" for r in layers), [r for r in layers if r.precision != "int8"]
    after = run["task"].model.state_dict()
    assert all(torch.equal(run["before"][k], v) for k, v in after.items())
