"""qcast.sensitivity: per-layer sensitivity on the QDQ simulation, with the float model as the oracle."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcast
from qcast.report import clear_sensitivity_cache, sqnr
from qcast.report.sensitivity import SensitivityReport, SensitivityRow

FAST = qcast.QuantConfig(calibration="minmax")


class Sensitive(nn.Module):
    """conv1 -> relu -> sens -> relu -> conv3 -> relu -> fc.

    ``conv1`` has one output channel with bias +1000, which ``sens`` ignores (zero weights). ``sens`` quantizes its
    input (an int8 op's inputs are quantized; conv1's output has no other int8 reader), whose range is then
    ~[0, 1000]: every other channel is crushed to a few steps of ~4. So only ``sens``'s input quantization suffers:
    keeping it float recovers almost everything, quantizing it alone costs almost everything.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.sens = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)
        with torch.no_grad():
            self.conv1.bias[0] = 1000.0
            self.sens.weight[:, 0] = 0.0

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.sens(x))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Sensitive().eval()


@pytest.mark.parametrize("mode", ["float_one", "quantize_one"])
def test_the_deliberately_sensitive_layer_ranks_first(model, mode):
    report = qcast.sensitivity(model, _data(), mode=mode, config=FAST, progress=False, cache=False)
    assert isinstance(report, SensitivityReport) and report.mode == mode
    assert [r.name for r in report.rows][0] == "sens", report.table()
    # candidates: exactly the int8 compute ops explain() names (flatten is a passthrough)
    assert sorted(report.names) == ["conv1", "conv3", "fc", "sens"]
    assert all(isinstance(r, SensitivityRow) for r in report.rows)
    deltas = [r.delta for r in report.rows]
    assert deltas == sorted(deltas, reverse=True)
    first, second = report.rows[0], report.rows[1]
    if mode == "float_one":
        # measured: sens in float 41 dB vs 9 dB fully int8, the others change it by < 0.01 dB
        assert report.baseline == report.quantized < 15.0
        assert first.value > 35.0 and first.delta > 20.0, report.table()
        assert abs(second.delta) < 1.0, report.table()
    else:
        # measured: sens alone int8 9 dB, every other layer alone int8 > 44 dB
        assert first.value < 15.0 and second.value > 35.0, report.table()


def test_the_simulation_tracks_the_real_int8_model(model):
    """The metric of the QDQ simulation against the real int8 model (the float model as the oracle in both)."""
    data = _data()
    report = qcast.sensitivity(model, data, config=FAST, progress=False, cache=False)
    ref = [model(x) for x in data]

    def real(config):
        q = qcast.quantize(model, data, config=config, progress=False)
        sig = sum(r.double().pow(2).sum().item() for r in ref)
        noise = sum((r.double() - q(x).double()).pow(2).sum().item() for r, x in zip(ref, data))
        return 10 * math.log10(sig / noise)

    assert report.quantized == pytest.approx(real(FAST), abs=1.5)
    row = {r.name: r for r in report.rows}
    assert row["sens"].value == pytest.approx(real(FAST.replace(skip=("sens",))), abs=1.5)
    # and the real int8 model agrees that sens is the layer that matters
    assert real(FAST.replace(skip=("sens",))) - real(FAST) > 20.0


def test_user_metric_is_called_with_a_model_like_the_float_one(model):
    data = _data()
    x = data[0]
    ref = model(x)
    seen = []

    def metric(m):
        out = m(x)
        seen.append(type(m).__name__)
        assert out.shape == ref.shape and not out.is_quantized
        return sqnr(ref, out)

    report = qcast.sensitivity(model, data, metric=metric, config=FAST, progress=False, cache=False)
    assert report.rows[0].name == "sens" and report.metric == "metric"
    assert len(seen) == 4 + 2  # one per candidate, plus fully quantized and float


def test_cache_returns_the_report_without_calling_the_metric_again(model):
    clear_sensitivity_cache()
    calls = []

    def metric(m):
        calls.append(1)
        return sqnr(model(_data()[0]), m(_data()[0]))

    first = qcast.sensitivity(model, _data(), metric=metric, config=FAST, progress=False)
    n = len(calls)
    assert n == 6
    again = qcast.sensitivity(model, _data(), metric=metric, config=FAST, progress=False)  # equal, fresh tensors
    assert again is first and len(calls) == n
    # anything in the key changed -> recomputed
    qcast.sensitivity(model, _data(), metric=metric, config=FAST, mode="quantize_one", progress=False)
    assert len(calls) == 2 * n
    qcast.sensitivity(model, _data(seed=1), metric=metric, config=FAST, progress=False)
    assert len(calls) == 3 * n
    changed = Sensitive().eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.fc.weight[0, 0] += 1.0
    qcast.sensitivity(changed, _data(), metric=metric, config=FAST, progress=False)
    assert len(calls) == 4 * n
    qcast.sensitivity(model, _data(), metric=metric, config=FAST, progress=False, cache=False)
    assert len(calls) == 5 * n
    clear_sensitivity_cache()


def test_table_and_json_are_readable(model):
    report = qcast.sensitivity(model, _data(2), config=FAST, progress=False)
    text = report.table()
    assert text.splitlines()[1].startswith("sens") and "most sensitive first" in text
    assert "sens" in repr(report)
    d = json.loads(report.to_json())
    assert d["mode"] == "float_one" and d["rows"][0]["name"] == "sens" and d["float"] is None  # inf -> null
    with pytest.raises(dataclasses_frozen()):
        report.rows[0].name = "x"


def dataclasses_frozen():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_bad_arguments_are_clear_errors(model):
    with pytest.raises(qcast.ConfigError, match="mode='both' is not one of"):
        qcast.sensitivity(model, _data(1), mode="both", progress=False)
    with pytest.raises(qcast.ConfigError, match="metric must be a function"):
        qcast.sensitivity(model, _data(1), metric=3.0, progress=False)
    with pytest.raises(qcast.EvalError, match=r"metric raised ZeroDivisionError.*fully quantized"):
        qcast.sensitivity(model, _data(1), metric=lambda m: 1 / 0, config=FAST, progress=False, cache=False)
    with pytest.raises(qcast.EvalError, match="metric returned str"):
        qcast.sensitivity(model, _data(1), metric=lambda m: "good", config=FAST, progress=False, cache=False)
    with pytest.raises(qcast.CalibrationError, match="no batches"):
        qcast.sensitivity(model, [], progress=False)


def build_sensitive():
    """Factory for the CLI test (``tests.report.test_sensitivity:build_sensitive``)."""
    torch.manual_seed(0)
    return Sensitive().eval()


def test_cli_sensitivity(tmp_path, capsys):
    from safetensors.torch import save_file

    from qcast.cli import main
    save_file({f"b{i}": x for i, x in enumerate(_data(2))}, str(tmp_path / "calib.safetensors"))
    out = tmp_path / "s.json"
    assert main(["sensitivity", "tests.report.test_sensitivity:build_sensitive", "--calib",
                 str(tmp_path / "calib.safetensors"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[1].startswith("sens") and "most sensitive first" in text
    assert json.loads(out.read_text())["rows"][0]["name"] == "sens"
