"""Concurrency and determinism.

* A quantized model called from several threads at once returns what serial calls return, bit for bit, on every
  backend (torch, OpenVINO, ONNX Runtime).
* The torch backend's int8 matmul (``QMatmul``) may switch oneDNN's fp32 matmuls to bf16 (process-wide) for its own
  exact integer GEMM; it must not do so while another thread may be running the user's float matmuls.
* ``quantize`` is deterministic run to run: same qparams, same outputs, same saved bytes.
"""
import concurrent.futures as cf
import importlib.util
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcast
from qcast.quantized import QDQ


class Block(nn.Module):
    """Conv stem with a residual, then tokens through an attention whose matmuls run int8, a float matmul with a
    weight (``x @ self.w``: float on the torch backend) and a float layer norm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.qkv = nn.Linear(16, 48)
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.conv(y) + y)
        t = y.flatten(2).transpose(1, 2)                     # (batch, tokens, 16)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) * 0.25, dim=-1) @ v
        t = self.norm(t + a @ self.w)
        return self.head(t.mean(1))


def _model():
    torch.manual_seed(0)
    m = Block().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(n)]


BACKENDS = [
    "torch",
    pytest.param("openvino", marks=pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                                      reason="openvino not installed")),
    pytest.param("onnxruntime", marks=pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                                         reason="onnxruntime not installed")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_from_several_threads_equal_serial_calls(backend):
    model = _model()
    activation = "int8" if backend != "torch" else "auto"   # static linears: every engine runs them int8
    q = qcast.quantize(model, _data(4, 0), config=qcast.QuantConfig(activation=activation), backend=backend,
                       progress=False, check_speed=False)
    assert q.qcast_meta["backend"] == backend
    inputs = _data(12, 1)
    with torch.no_grad():
        serial = [q(x) for x in inputs]
    barrier = threading.Barrier(4)

    def worker(i):
        barrier.wait()  # all four threads call at once
        with torch.no_grad():
            return [(j, q(inputs[j])) for j in range(i, len(inputs), 4) for _ in range(3)]

    with cf.ThreadPoolExecutor(4) as pool:
        results = [r for chunk in pool.map(worker, range(4)) for r in chunk]
    assert len(results) == 3 * len(inputs)
    for j, out in results:
        assert torch.equal(out, serial[j]), f"{backend}: input {j} gave another result from a thread"


def test_an_int8_matmul_leaves_float_matmuls_of_other_threads_in_fp32():
    """While one thread runs the quantized model (int8 attention matmuls), another computes float matmuls of its
    own: they must equal the same matmuls computed alone (fp32, not bf16)."""
    q = qcast.quantize(_model(), _data(4, 0), backend="torch", progress=False, check_speed=False)
    assert any(r.op == "matmul" and r.precision == "int8" for r in qcast.explain(q))
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(64, 256, generator=g), torch.randn(256, 64, generator=g)
    ref = a @ b
    stop, bad, x = threading.Event(), [], _data(1, 2)[0]

    def run_model():
        with torch.no_grad():
            while not stop.is_set():
                q(x)

    t = threading.Thread(target=run_model)
    t.start()
    try:
        for _ in range(300):
            if not torch.equal(a @ b, ref):
                bad.append(1)
    finally:
        stop.set()
        t.join()
    assert not bad, f"{len(bad)} of 300 float matmuls in another thread ran at another precision"


def _qparams(q):
    return [(m.name, m.qparams) for m in q.qcast_qdq.modules() if isinstance(m, QDQ)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_is_deterministic(tmp_path, backend):
    """Twice from scratch (a fresh model each time): the same qparams, outputs and saved bytes."""
    runs = []
    for i in range(2):
        q = qcast.quantize(_model(), _data(4, 0), backend=backend, progress=False)  # speed check on: timings vary
        qcast.save(q, tmp_path / f"{i}.qcast")
        with torch.no_grad():
            out = q(_data(1, 5)[0])
        runs.append((_qparams(q), out, (tmp_path / f"{i}.qcast").read_bytes(), qcast.explain(q)))
    (p1, o1, b1, r1), (p2, o2, b2, r2) = runs
    assert p1 and p1 == p2
    assert torch.equal(o1, o2)
    assert r1 == r2
    assert b1 == b2, "the same model quantized twice saved to different bytes"
