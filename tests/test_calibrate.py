"""calibrate(): what data it accepts, how it fails, and the summary it returns."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import qcast
from qcast.errors import CalibrationError, InputError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


def _batches(n, seed=0, shape=(2, 3, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _with_nonfinite(value, at=(0, 1, 2, 3)):
    x = _batches(1, seed=7)[0]
    x[at] = value
    return x


FAST = qcast.QuantConfig(calibration="minmax")


# ------------------------------------------------------------------------------------------------
# empty data
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [[], (), "generator"], ids=["list", "tuple", "generator"])
def test_empty_data_is_a_calibration_error(data):
    if data == "generator":
        data = (x for x in [])
    with pytest.raises(CalibrationError, match="no batches"):
        qcast.quantize(_net(), data, progress=False)


def test_calibrate_with_empty_data_is_a_calibration_error():
    observed = qcast.prepare(_net(), _batches(1)[0], FAST)
    with pytest.raises(CalibrationError, match="no batches"):
        qcast.calibrate(observed, [], progress=False)


def test_consumed_generator_is_reported_as_empty():
    gen = iter(_batches(3))
    qcast.quantize(_net(), gen, config=FAST, progress=False)
    with pytest.raises(CalibrationError, match="generator"):
        qcast.quantize(_net(), gen, config=FAST, progress=False)


@pytest.mark.parametrize("data", [None, 5], ids=["None", "int"])
def test_non_iterable_data_is_a_calibration_error(data):
    with pytest.raises(CalibrationError, match="calibration_data"):
        qcast.quantize(_net(), data, progress=False)


def test_items_that_are_not_calls_are_input_errors():
    with pytest.raises(InputError, match="str"):
        qcast.quantize(_net(), ["not a tensor"], progress=False)


@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_bad_num_batches_is_a_calibration_error(n):
    with pytest.raises(CalibrationError, match="num_batches"):
        qcast.quantize(_net(), _batches(2), num_batches=n, progress=False)


# ------------------------------------------------------------------------------------------------
# non-finite data
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_batch_names_the_batch_index(value):
    data = _batches(2) + [_with_nonfinite(value)] + _batches(2, seed=1)
    with pytest.raises(CalibrationError) as e:
        qcast.quantize(_net(), data, config=FAST, progress=False)
    assert re.search(r"\bbatch 2\b", str(e.value)), str(e.value)
    assert "NaN/Inf" in str(e.value)


def test_nonfinite_batch_through_calibrate_names_the_batch_index():
    observed = qcast.prepare(_net(), _batches(1)[0], FAST)
    with pytest.raises(CalibrationError, match=r"\bbatch 3\b"):
        qcast.calibrate(observed, _batches(3) + [_with_nonfinite(float("nan"))], progress=False)


def test_nonfinite_first_batch_names_batch_0():
    with pytest.raises(CalibrationError, match=r"\bbatch 0\b"):
        qcast.quantize(_net(), [_with_nonfinite(float("nan"))] + _batches(3), config=FAST, progress=False)


def test_nan_inside_the_model_names_the_layer():
    class Log(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.head(torch.log(self.conv(x)))  # log of negative values -> NaN reaches head's input

    with pytest.raises(CalibrationError) as e:
        qcast.quantize(Log().eval(), _batches(2), config=FAST, progress=False)
    assert "log" in str(e.value) and "batch 0" in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------------
# inputs that do not fit
# ------------------------------------------------------------------------------------------------
def test_wrong_channels_in_first_batch_is_an_input_error_naming_the_layer():
    with pytest.raises(InputError) as e:
        qcast.quantize(_net(), _batches(2, shape=(2, 4, 16, 16)), progress=False)
    assert "0 (conv2d)" in str(e.value) and "channels" in str(e.value)


def test_wrong_channels_in_a_later_batch_names_the_batch():
    data = _batches(2) + _batches(1, shape=(2, 5, 16, 16))
    with pytest.raises(InputError, match=r"calibration batch 2 \(Tensor\[2, 5, 16, 16\]"):
        qcast.quantize(_net(), data, config=FAST, progress=False)


@pytest.mark.parametrize("shape", [(2, 5, 16, 16), (3, 16, 16)], ids=["channels", "rank"])
def test_quantized_model_rejects_inputs_that_do_not_fit(shape):
    qmodel = qcast.quantize(_net(), _batches(2), config=FAST, progress=False)
    with pytest.raises(InputError) as e:
        qmodel(torch.randn(*shape))
    msg = str(e.value)
    assert "at 0 (conv2d)" in msg, msg  # names the layer
    assert "[2, 3, 16, 16]" in msg, msg  # and what the model was prepared with


# ------------------------------------------------------------------------------------------------
# progress and summary
# ------------------------------------------------------------------------------------------------
def test_progress_false_prints_nothing(capsys):
    qcast.quantize(_net(), _batches(3), config=FAST, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_true_shows_a_calibration_bar(capsys):
    pytest.importorskip("tqdm", reason="tqdm is a declared dependency; the progress bar needs it")
    qcast.quantize(_net(), _batches(3), config=FAST, progress=True)
    assert "qcast calibrate" in capsys.readouterr().err


def test_summary_has_batches_and_per_tensor_ranges():
    model = _net()
    observed = qcast.prepare(model, _batches(1)[0])
    data = _batches(5)
    summary = qcast.calibrate(observed, data, progress=False)
    assert isinstance(summary, qcast.CalibrationSummary)
    assert summary.batches == 5
    names = [r.name for r in summary.ranges]
    assert len(names) == len(set(names)) >= 2
    assert "0" in names  # named after the layers that produce the tensors
    assert "3" not in names  # the last conv's output is the model's: nothing int8 reads it, written fp32, unobserved
    first = summary.ranges[0]  # the model input
    seen = torch.cat(data)
    assert first.min == pytest.approx(float(seen.min())) and first.max == pytest.approx(float(seen.max()))
    for r in summary.ranges:
        assert r.estimator == "mse"
        assert r.min <= r.max and r.clip_min < r.clip_max
        assert min(r.min, 0.0) - 1e-6 <= r.clip_min and r.clip_max <= max(r.max, 0.0) + 1e-6
    relu_out = next(r for r in summary.ranges if r.name == "0")  # conv+bn+relu output
    assert relu_out.min >= 0.0
    table = summary.table()
    assert all(n in table for n in names) and "clip max" in table
    assert observed.qcast_summary is summary


def test_calibrating_again_accumulates():
    observed = qcast.prepare(_net(), _batches(1)[0], FAST)
    assert qcast.calibrate(observed, _batches(2), progress=False).batches == 2
    summary = qcast.calibrate(observed, _batches(3, seed=5) + [_batches(1)[0] * 10], progress=False)
    assert summary.batches == 6
    assert summary.ranges[0].max > 10.0  # the x10 batch widened the input range seen so far
    qmodel = qcast.convert(observed)
    assert qmodel.qcast_meta["calibration_batches"] == 6


def test_calibrate_and_convert_reject_other_models():
    with pytest.raises(CalibrationError, match="prepare"):
        qcast.calibrate(_net(), _batches(1), progress=False)
    with pytest.raises(qcast.UnsupportedError, match="prepare"):
        qcast.convert(_net())
