"""qcast.quantize(..., eval_fn=, max_drop=): the accuracy-aware mode, with the float model as the oracle."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcast
from qcast.accuracy import AccuracySearch, SearchStep

FAST = qcast.QuantConfig(calibration="minmax")


class TwoOutliers(nn.Module):
    """Six int8 compute layers; ``a`` and ``b`` each read a channel with bias +1000 (from conv1, conv3) that they
    ignore (zero weights), so their int8 input params crush every other channel: both must stay float (then nothing
    int8 reads those values, which stay fp32), the other four can be int8."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.conv5 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)
        with torch.no_grad():
            self.conv1.bias[0] = 1000.0
            self.a.weight[:, 0] = 0.0
            self.conv3.bias[3] = 1000.0
            self.b.weight[:, 3] = 0.0

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.a(x))
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.conv5(x))
        return self.fc(torch.flatten(x, 1))


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TwoOutliers().eval()


def rel_error_metric(model, data):
    """-(relative L2 error of the output vs the float model) on held-out data: 0 for float, higher is better."""
    with torch.no_grad():
        refs = [model(x) for x in data]

    @torch.no_grad()
    def fn(m):
        num = sum((r - m(x)).pow(2).sum() for r, x in zip(refs, data))
        den = sum(r.pow(2).sum() for r in refs)
        return -float((num / den).sqrt())
    return fn


def test_meets_max_drop_keeping_only_the_sensitive_layers_float(model, caplog):
    fn = rel_error_metric(model, _data(2, seed=7))
    full = qcast.quantize(model, _data(), config=FAST, progress=False)
    assert fn(full) < -0.1  # full int8 misses the target (max_drop 0.05) by far: measured -0.117
    with caplog.at_level(logging.INFO, logger="qcast"):
        qmodel = qcast.quantize(model, _data(), config=FAST, eval_fn=fn, max_drop=0.05, progress=False)
    assert fn(qmodel) >= fn(model) - 0.05
    search = qmodel.qcast_meta["accuracy_search"]
    assert isinstance(search, AccuracySearch) and search.met
    assert set(search.float_layers) == {"a", "b"}, search.table()
    # float_one ranks one of them first; the other is masked (with b int8, floating a alone barely helps) and is
    # found by the binary search plus the pruning pass (measured ranking: b, conv5, conv1, a, ...; steps 6, 3, 4
    # float, then conv1 and conv5 pruned back to int8)
    assert search.ranking[0] in ("a", "b") and "eval_fn" in search.ranked_by
    assert search.metric == pytest.approx(fn(qmodel))
    float_rows = {r.name for r in qcast.explain(qmodel) if r.precision == "float" and r.op in ("conv2d", "linear")}
    assert float_rows == {"a", "b"}
    # every step recorded, the first is the fully int8 model
    assert all(isinstance(s, SearchStep) for s in search.steps)
    assert search.steps[0].float_layers == () and not search.steps[0].meets
    assert search.target == pytest.approx(search.float_metric - 0.05)
    assert "target met" in search.table() and "accuracy-aware" in caplog.text
    # the user's model is untouched and the result saves like any int8 model
    assert not model.training and model.conv1.bias[0].item() == 1000.0


def test_a_model_that_already_meets_the_target_is_returned_fully_int8(model, capsys):
    fn = rel_error_metric(model, _data(2, seed=7))
    qmodel = qcast.quantize(model, _data(), config=FAST, eval_fn=fn, max_drop=10.0, progress=True)
    search = qmodel.qcast_meta["accuracy_search"]
    assert search.met and search.float_layers == () and len(search.steps) == 1
    assert all(r.precision == "int8" for r in qcast.explain(qmodel) if r.op in ("conv2d", "linear"))
    assert "accuracy-aware quantization" in capsys.readouterr().out


def test_unreachable_target_warns_and_returns_the_best_model(model, tmp_path):
    def fn(m):  # no quantized model can reach the float model's score
        return 1.0 if not isinstance(m, qcast.QuantizedModel) else 0.0

    with pytest.warns(UserWarning, match="was not met, even with all 6 candidate layers in float"):
        qmodel = qcast.quantize(model, _data(), config=FAST, eval_fn=fn, max_drop=0.5, progress=False)
    search = qmodel.qcast_meta["accuracy_search"]
    assert not search.met and search.metric == 0.0
    assert search.float_layers == ()  # all steps score the same: the best is the one with the fewest float layers
    assert "TARGET NOT MET" in search.table()
    qcast.save(qmodel, tmp_path / "m.qcast")  # the search report is not part of the file
    assert "accuracy_search" not in qcast.load(tmp_path / "m.qcast").qcast_meta


def test_bad_arguments_are_clear_errors(model):
    data = _data(1)
    with pytest.raises(qcast.ConfigError, match="max_drop=0.01 needs eval_fn"):
        qcast.quantize(model, data, max_drop=0.01)
    with pytest.raises(qcast.ConfigError, match="eval_fn needs max_drop"):
        qcast.quantize(model, data, eval_fn=lambda m: 1.0)
    with pytest.raises(qcast.ConfigError, match="max_drop must be a finite number >= 0"):
        qcast.quantize(model, data, eval_fn=lambda m: 1.0, max_drop=-1)
    with pytest.raises(qcast.ConfigError, match="eval_fn must be a function"):
        qcast.quantize(model, data, eval_fn="accuracy", max_drop=0.1)
    with pytest.raises(qcast.EvalError, match=r"eval_fn raised KeyError.*the float model"):
        qcast.quantize(model, data, config=FAST, eval_fn=lambda m: {}["x"], max_drop=0.1, progress=False)
    with pytest.raises(qcast.EvalError, match="eval_fn returned NaN"):
        qcast.quantize(model, data, config=FAST, eval_fn=lambda m: float("nan"), max_drop=0.1, progress=False)
    calls = []

    def fails_on_int8(m):
        calls.append(m)
        if isinstance(m, qcast.QuantizedModel):
            raise RuntimeError("boom")
        return 1.0
    with pytest.raises(qcast.EvalError, match=r"eval_fn raised RuntimeError: boom \(while evaluating the int8 model"):
        qcast.quantize(model, data, config=FAST, eval_fn=fails_on_int8, max_drop=0.1, progress=False)


def test_a_generator_of_calibration_data_serves_every_search_step(model):
    fn = rel_error_metric(model, _data(2, seed=7))
    qmodel = qcast.quantize(model, (x for x in _data()), config=FAST, eval_fn=fn, max_drop=0.05, progress=False)
    assert qmodel.qcast_meta["accuracy_search"].met
    assert qmodel.qcast_meta["calibration_summary"].batches == 4
