"""LSTM / GRU: dynamic int8 on the torch backend (kernels/recurrent.py), float on the engines with explain() saying so;
the float model is the oracle. fx captures an nn.LSTM as one call_module leaf whose value is ``(out, (h, c))``."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn

import qcast
from tests.helpers import sqnr


class Seq(nn.Module):
    """linear -> LSTM/GRU -> linear on every step; the final state read too (tuple output of the model)."""

    def __init__(self, cell: str, batch_first: bool, layers: int, bidirectional: bool, init: bool):
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.inp = nn.Linear(6, 12)
        self.rnn = rnn(12, 16, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional)
        self.head = nn.Linear(16 * (2 if bidirectional else 1), 5)
        self.cell, self.init = cell, init
        n = layers * (2 if bidirectional else 1)
        self.register_buffer("h0", torch.randn(n, 1, 16) * 0.5)

    def forward(self, x):
        batch = x.shape[0] if self.rnn.batch_first else x.shape[1]
        state = None
        if self.init:
            h0 = self.h0.expand(-1, batch, -1).contiguous()
            state = (h0, torch.tanh(h0)) if self.cell == "lstm" else h0
        out, hidden = self.rnn(self.inp(x), state)
        h = hidden[0] if self.cell == "lstm" else hidden
        return self.head(out), h


CONFIGS = [  # (batch_first, layers, bidirectional, init)
    (False, 1, False, False), (True, 1, False, True), (False, 2, True, True), (True, 2, True, False)]


def _data(batch_first, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*((3, 7, 6) if batch_first else (7, 3, 6)), generator=g) for _ in range(n)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "bf{}-l{}-bi{}-init{}".format(*map(int, c)))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_runs_dynamic_int8_close_to_float(cell, config):
    torch.manual_seed(0)
    model = Seq(cell, *config).eval()
    q = qcast.quantize(model, _data(config[0]), backend="torch")
    row = next(r for r in qcast.explain(q) if r.op == cell)
    assert row.precision == "int8" and row.engine == "fbgemm" and "dynamic int8" in row.reason, row
    assert "QRecurrentDynamic" in repr(q)
    x = _data(config[0], n=1, seed=7)[0]
    with torch.no_grad():
        ref, out = model(x), q(x)
    # measured 33-41 dB (output), 35-44 dB (state) over these configurations
    assert sqnr(ref[0], out[0]) >= 30.0 and sqnr(ref[1], out[1]) >= 30.0


def test_kernel_matches_torch_dynamic_module_and_rebuilds_bit_for_bit():
    """The kernel is torch.ao's dynamic LSTM with per-channel weights; rebuilt from spec() (deepcopy, files) it computes
    the same bits."""
    import copy

    from qcast.backends.torch.kernels.recurrent import QRecurrentDynamic
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True).eval()
    k = QRecurrentDynamic.from_float(lstm)
    x = torch.randn(5, 2, 8)
    y, (h, c) = k(x)
    ref, (rh, rc) = lstm(x)
    assert sqnr(ref, y) >= 35.0 and sqnr(rc, c) >= 35.0
    y2, _ = copy.deepcopy(k)(x)
    assert torch.equal(y, y2)


def test_projection_lstm_stays_float_with_reason():
    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(6, 16, proj_size=8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    model = P().eval()
    q = qcast.quantize(model, _data(False), backend="torch")
    row = next(r for r in qcast.explain(q) if r.op == "lstm")
    assert row.precision == "float" and "proj_size" in row.reason, row
    x = _data(False, 1, 3)[0]
    with torch.no_grad():
        assert sqnr(model(x), q(x)) >= 30.0


def test_save_load_round_trips_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = Seq("lstm", True, 2, True, True).eval()
    q = qcast.quantize(model, _data(True), backend="torch")
    qcast.save(q, tmp_path / "m.qcast")
    loaded = qcast.load(tmp_path / "m.qcast", backend="torch")
    x = _data(True, 1, 5)[0]
    with torch.no_grad():
        a, b = q(x), loaded(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert [r.precision for r in qcast.explain(loaded)] == [r.precision for r in qcast.explain(q)]


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_engines_run_recurrent_layers_in_float_and_say_so(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} not installed")
    torch.manual_seed(0)
    model = Seq("lstm", True, 1, False, True).eval()
    q = qcast.quantize(model, _data(True), backend=backend)
    row = next(r for r in qcast.explain(q) if r.op == "lstm")
    assert row.precision == "float" and "runs it in float" in row.reason and "backend='torch'" in row.reason, row
    # read back from the engine's compiled model: OpenVINO's layer in f32 (RNNSeq, or TensorIterator depending on its
    # front end), ONNX Runtime's float LSTM node
    assert "read back" in row.reason and (" in f32" in row.reason or "LSTM (float)" in row.reason), row
    x = _data(True, 1, 7)[0]
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert sqnr(ref[0], out[0]) >= 30.0 and sqnr(ref[1], out[1]) >= 30.0


def test_layer_without_bias_runs_int8_and_unbatched_input_stays_float():
    from qcast.backends.torch.kernels.recurrent import QRecurrentDynamic
    torch.manual_seed(0)
    gru = nn.GRU(6, 12, bias=False).eval()
    x = torch.randn(7, 3, 6)
    assert sqnr(gru(x)[0], QRecurrentDynamic.from_float(gru)(x)[0]) >= 35.0  # zero biases: the same function

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(6, 12), nn.Linear(12, 2)

        def forward(self, x):  # (steps, features): no batch dim
            return self.fc(self.rnn(x)[0])

    model = Unbatched().eval()
    q = qcast.quantize(model, [torch.randn(7, 6) for _ in range(3)], backend="torch")
    row = next(r for r in qcast.explain(q) if r.op == "lstm")
    assert row.precision == "float" and "unbatched" in row.reason, row
