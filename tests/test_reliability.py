"""Rows of docs/reliability.md that no other test pins: each bad input gets its QcastError (the message names the
argument or layer and the fix), and the user's model and files are never changed. The table names, for every row,
the test that pins it (here or elsewhere)."""
import importlib.util
import os

import pytest
import torch
import torch.nn as nn

import qcast
from tests.fuzz.properties import assert_unchanged, snapshot

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()


def _q(model=None):
    return qcast.quantize(model or _model(), [X, X * 0.5], progress=False, check_speed=False)


# (row, call, error class, message pattern); each call gets a fresh model, checked unchanged afterwards
BAD_QUANTIZE = {
    "float64 calibration data": (lambda m: qcast.quantize(m, [X.double()], progress=False),
                                 qcast.InputError, r"0 \(conv2d\).*double"),
    "integer calibration data": (lambda m: qcast.quantize(m, [X.long()], progress=False),
                                 qcast.InputError, r"0 \(conv2d\)"),
    "empty batch": (lambda m: qcast.quantize(m, [X[:0]], progress=False), qcast.CalibrationError, "no values"),
    "input_fn raising": (lambda m: qcast.quantize(m, [(X, 1)], input_fn=lambda b: b[5], progress=False),
                         qcast.CalibrationError, r"input_fn raised IndexError.*item 0.*batch\[0\]"),
    "calibration data None": (lambda m: qcast.quantize(m, None, progress=False), qcast.CalibrationError, "None"),
    "unknown backend": (lambda m: qcast.quantize(m, [X], backend="openvno", progress=False), qcast.UnsupportedError,
                        "unknown backend 'openvno'.*openvino"),
    "unknown config key": (lambda m: qcast.quantize(m, [X], config={"wieght": "int8"}, progress=False),
                           qcast.ConfigError, "did you mean 'weight'"),
    "unknown scheme name": (lambda m: qcast.quantize(m, [X], config={"weight": "int7"}, progress=False),
                            qcast.ConfigError, "int7.*weight_bits"),
    "max_drop without eval_fn": (lambda m: qcast.quantize(m, [X], max_drop=0.1, progress=False), qcast.ConfigError,
                                 "needs eval_fn"),
    "eval_fn raising": (lambda m: qcast.quantize(m, [X, X], eval_fn=lambda _: 1 / 0, max_drop=0.1, progress=False,
                                                 check_speed=False), qcast.EvalError, "ZeroDivisionError"),
}


@pytest.mark.parametrize("row", list(BAD_QUANTIZE))
def test_bad_quantize_calls_raise_their_error_and_leave_the_model_alone(row):
    call, error, pattern = BAD_QUANTIZE[row]
    model = _model().train()  # a training-mode model: its flag must survive too
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        call(model)
    assert_unchanged(model, before)


def test_constant_calibration_data_gives_a_working_model():
    """All-zero calibration data (e.g. a blank image set): every range is degenerate; the model still quantizes and
    runs finite, and a real input gives finite outputs (values beyond the calibrated range saturate)."""
    model = _model()
    q = qcast.quantize(model, [torch.zeros(2, 3, 8, 8)] * 2, progress=False, check_speed=False)
    with torch.no_grad():
        out = q(X)
        zeros = q(torch.zeros(2, 3, 8, 8))
        ref = model(torch.zeros(2, 3, 8, 8))
    assert torch.isfinite(out).all()
    assert torch.allclose(zeros, ref, atol=0.05), (zeros, ref)


def test_quantizing_a_quantized_model_says_to_quantize_the_float_one():
    q = _q()
    with pytest.raises(qcast.UnsupportedError, match="already quantized.*float model"):
        qcast.quantize(q, [X], progress=False)


def test_save_and_load_on_folders_are_format_errors(tmp_path):
    q = _q()
    with pytest.raises(qcast.FormatError, match="cannot write.*existing, writable folder"):
        qcast.save(q, tmp_path)
    with pytest.raises(qcast.FormatError, match="cannot write"):
        qcast.save(q, tmp_path / "missing" / "m.qcast")
    with pytest.raises(qcast.FormatError, match="not a file"):
        qcast.load(tmp_path)
    assert os.listdir(tmp_path) == [], "a failed save left a file behind"


def test_a_failed_save_leaves_an_existing_file_intact(tmp_path, monkeypatch):
    """save() writes a temporary file and renames it: an error while writing keeps the user's previous file."""
    q = _q()
    path = tmp_path / "m.qcast"
    qcast.save(q, path)
    before = path.read_bytes()
    import qcast.serialize as ser

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ser.os, "replace", broken)
    with pytest.raises(qcast.FormatError, match="No space left"):
        qcast.save(q, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.qcast"]


def test_loading_never_changes_the_file(tmp_path):
    q = _q()
    path = tmp_path / "m.qcast"
    qcast.save(q, path)
    before, mtime = path.read_bytes(), os.stat(path).st_mtime_ns
    qcast.load(path)
    assert path.read_bytes() == before and os.stat(path).st_mtime_ns == mtime


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_a_missing_optional_engine_names_the_pip_command(monkeypatch, tmp_path, engine):
    """As if the engine were not installed: backend=<engine> says how to install it, auto quietly does without it,
    and a saved model still loads."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == engine else real(name, *a))
    with pytest.raises(qcast.UnsupportedError, match=f"pip install.*{engine}"):
        qcast.quantize(_model(), [X], backend=engine, progress=False)
    q = qcast.quantize(_model(), [X, X], backend="auto", progress=False, check_speed=False)
    assert q.qcast_meta["backend"] != engine
    qcast.save(q, tmp_path / "m.qcast")
    with pytest.raises(qcast.UnsupportedError, match="pip install"):
        qcast.load(tmp_path / "m.qcast", backend=engine)
    assert qcast.load(tmp_path / "m.qcast", backend="auto").qcast_meta["backend"] != engine


@pytest.mark.parametrize("call, pattern", [
    (lambda q: q(X, foo=1), "unexpected keyword argument 'foo'"),
    (lambda q: q(), "missing (a|1) required"),
    (lambda q: q(X[:, :2]), "channels"),
    (lambda q: q(X.half()), "float32"),
])
def test_bad_calls_of_the_quantized_model_are_input_errors(call, pattern):
    with pytest.raises(qcast.InputError, match=pattern):
        call(_q())
