"""EmbeddingBag with 8-bit rows (kernels/embedding_bag.py), the float layer as the oracle: sum and mean int8 (offsets,
include_last_offset, 2-D bags, per_sample_weights), max float with the measured reason; on the engines the layer is
not given to them and the torch kernel runs it between their stages."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn

import qcast
from qcast.backends.torch.kernels.embedding_bag import QEmbeddingBag
from tests.helpers import sqnr


@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_kernel_against_the_float_bag(mode, include_last_offset):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(50, 16, mode=mode, include_last_offset=include_last_offset)
    k = QEmbeddingBag.from_float(bag.weight, mode, include_last_offset)
    i = torch.randint(0, 50, (12,))
    o = torch.tensor([0, 5, 5, 12]) if include_last_offset else torch.tensor([0, 5, 5])  # an empty bag too
    assert sqnr(bag(i, o), k(i, o)) >= 40.0  # measured 47-49 dB: the rows' 8-bit rounding
    i2 = torch.randint(0, 50, (4, 3))
    assert sqnr(bag(i2), k(i2)) >= 40.0  # measured 49-51 dB
    if mode == "sum":
        w = torch.rand(12)
        assert sqnr(bag(i, o, w), k(i, o, w)) >= 40.0  # measured 47-49 dB


def test_pytorch_int8_bag_op_ignores_mode():
    """Why mean is a sum divided in fp32 and max stays float: the op returns the sum whatever mode it is given."""
    torch.manual_seed(0)
    w = torch.randn(50, 16)
    qw = torch.quantize_per_channel(w, *_rows(w), 0, torch.quint8)
    packed = torch.ops.quantized.embedding_bag_prepack(qw)
    i, o = torch.randint(0, 50, (12,)), torch.tensor([0, 4, 8])
    summed = torch.nn.functional.embedding_bag(i, qw.dequantize(), o, mode="sum")
    for mode in (1, 2):  # mean, max
        got = torch.ops.quantized.embedding_bag_byte(packed, i, o, False, mode, False, None, None, False)
        assert torch.allclose(got, summed, atol=1e-5)


def _rows(w):
    from qcast.backends.torch.kernels.transformer import embedding_qparams
    return embedding_qparams(w)


class Bags(nn.Module):
    def __init__(self, mode, psw=False):
        super().__init__()
        self.bag, self.fc, self.psw = nn.EmbeddingBag(60, 16, mode=mode), nn.Linear(16, 4), psw

    def forward(self, indices, offsets, weights):
        return self.fc(self.bag(indices, offsets, weights if self.psw else None))


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 60, (20,), generator=g), torch.tensor([0, 4, 9, 15]), torch.rand(20, generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("mode, psw", [("sum", False), ("sum", True), ("mean", False)])
def test_model_with_an_int8_bag_close_to_float(mode, psw):
    torch.manual_seed(0)
    model = Bags(mode, psw).eval()
    q = qcast.quantize(model, _batches(), backend="torch")
    row = next(r for r in qcast.explain(q) if r.op == "embedding_bag")
    assert row.precision == "int8" and f"mode={mode}" in row.reason, row
    x = _batches(1, seed=9)[0]
    with torch.no_grad():
        assert sqnr(model(*x), q(*x)) >= 30.0


def test_max_bag_stays_float_with_the_measured_reason():
    model = Bags("max").eval()
    q = qcast.quantize(model, _batches(), backend="torch")
    row = next(r for r in qcast.explain(q) if r.op == "embedding_bag")
    assert row.precision == "float" and "sums whatever mode" in row.reason and "dB" in row.reason, row
    x = _batches(1, seed=9)[0]
    with torch.no_grad():
        assert sqnr(model(*x), q(*x)) >= 30.0


def test_padding_idx_stays_float_with_reason():
    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(60, 16, mode="sum", padding_idx=0)

        def forward(self, indices, offsets):
            return self.bag(indices, offsets)

    q = qcast.quantize(P().eval(), [b[:2] for b in _batches()], backend="torch")
    row = next(r for r in qcast.explain(q) if r.op == "embedding_bag")
    assert row.precision == "float" and "padding_idx" in row.reason, row


def test_save_load_round_trips_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = Bags("mean").eval()
    q = qcast.quantize(model, _batches(), backend="torch")
    qcast.save(q, tmp_path / "m.qcast")
    loaded = qcast.load(tmp_path / "m.qcast", backend="torch")
    x = _batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(q(*x), loaded(*x))


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_engines_run_the_bag_int8_in_torch_between_their_stages(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} not installed")
    torch.manual_seed(0)
    model = Bags("sum").eval()
    q = qcast.quantize(model, _batches(), backend=backend)
    row = next(r for r in qcast.explain(q) if r.op == "embedding_bag")
    assert row.precision == "int8" and row.engine.startswith("torch:") and f"not given to {backend}" in row.reason, row
    x = _batches(1, seed=9)[0]
    with torch.no_grad():
        assert sqnr(model(*x), q(*x)) >= 30.0

