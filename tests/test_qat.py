"""Quantization-aware training (qcast.prepare_qat -> train -> qcast.convert) and qcast.simulate, on a small CNN trained
here on scikit-learn's digits (8x8 images, 1797 samples: seconds on 2 cores)."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn

import qcast
from qcast import QcastError, QuantConfig
from qcast.qat import QATLayer
from qcast.quantized import QDQ
from tests.helpers import sqnr

sklearn = pytest.importorskip("sklearn.datasets")


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


class Digits:
    def __init__(self):
        d = sklearn.load_digits()
        self.x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        self.y = torch.tensor(d.target)
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(0))
        self.train_idx, self.test_idx = perm[:1400], perm[1400:]
        self.calib = [self.x[self.train_idx[i:i + 64]] for i in range(0, 512, 64)]

    def train(self, model, epochs, lr, opt="adam", bs=64, steps=None):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr) if opt == "adam" else torch.optim.SGD(params, lr=lr)
        g = torch.Generator().manual_seed(1)
        model.train()
        done = 0
        for _ in range(epochs):
            p = self.train_idx[torch.randperm(len(self.train_idx), generator=g)]
            for i in range(0, len(p), bs):
                idx = p[i:i + bs]
                loss = nn.functional.cross_entropy(model(self.x[idx]), self.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if steps is not None and done >= steps:
                    return model
        return model

    def evaluate(self, model) -> tuple[float, float]:
        """(accuracy in %, mean cross-entropy) on the held-out 397 images."""
        model.eval()
        with torch.no_grad():
            out = model(self.x[self.test_idx])
        acc = (out.argmax(1) == self.y[self.test_idx]).float().mean().item() * 100
        return acc, nn.functional.cross_entropy(out, self.y[self.test_idx]).item()


@pytest.fixture(scope="module")
def digits():
    return Digits()


@pytest.fixture(scope="module")
def float_model(digits):
    torch.manual_seed(0)
    return digits.train(DigitsCNN(), epochs=8, lr=1e-2).eval()


INT4 = QuantConfig(weight="int4", backend="torch")


def _qat(model, digits, config=INT4, epochs=3, **kw):
    prepared = qcast.prepare_qat(model, digits.calib[0], config, freeze_bn_after=kw.pop("freeze_bn_after", 150),
                                 freeze_observers_after=kw.pop("freeze_observers_after", 150), **kw)
    return digits.train(prepared, epochs=epochs, lr=1e-3)


def _agrees(prepared, qmodel, x, floor=40.0):
    prepared.eval()
    with torch.no_grad():
        s = sqnr(prepared(x), qmodel(x))
    assert s >= floor, f"converted QAT model vs its QAT simulation: {s:.1f} dB"


def test_int4_qat_is_within_a_point_of_float_as_is_int4_ptq(digits, float_model):
    """int4 weights: QAT within a point of float, and its converted model computes what it trained.

    int4 PTQ is within a point of float here too (nearest and AdaRound), so on this CNN QAT cannot be shown above
    it on accuracy. ``benchmarks/qat_vs_ptq.py`` compared them over narrower/deeper CNNs, depthwise CNNs, symmetric
    and power-of-two activations, longer float training and 3-6 seeds each (docs/qat.md): QAT comes out more than a
    point above both PTQs only on a narrow, not fully trained CNN, by one to four images of 397 per seed (a margin
    the CPU a test runs on can flip: a pinned QAT >= PTQ accuracy check on this CNN failed on another machine); with
    converged float models int4 PTQ is within 0.2-0.6 points of float and QAT no better. What holds on every model
    and seed is checked: QAT and both PTQs within a point of float, and the converted model equal to the trained one."""
    f_acc, _ = digits.evaluate(float_model)
    for rounding in ("nearest", "adaround"):
        ptq = qcast.quantize(float_model, digits.calib, config=INT4.replace(rounding=rounding, adaround_iters=300),
                             progress=False, check_speed=False)
        assert digits.evaluate(ptq)[0] >= f_acc - 1.0, rounding
    prepared = _qat(float_model, digits)
    qmodel = qcast.convert(prepared)
    q_acc, _ = digits.evaluate(qmodel)
    assert q_acc >= f_acc - 1.0, (q_acc, f_acc)
    _agrees(prepared, qmodel, digits.x[digits.test_idx])
    rows = [r for r in qcast.explain(qmodel) if r.op in ("conv2d", "linear")]
    assert all(r.precision == "int8" and "int4 weights" in r.reason for r in rows), rows


@qcast.register_quantizer("test_qat_pow2")
class Pow2STE(qcast.FakeQuantizer):
    """Signed 8-bit (activations: unsigned) with a power-of-two scale, per tensor, straight-through gradient."""

    def _scale(self, x=None):
        if x is not None:
            amax = x.detach().abs().max()
        else:
            amax = torch.maximum(self.max_val, -self.min_val)
        return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(1e-8) / 127)))

    def forward(self, x):
        weight = x.dim() > 2 and not torch.isfinite(self.max_val)  # weights: no observed range, follow the weight
        s = self._scale(x if weight or not torch.isfinite(self.max_val) else None)
        q = torch.clamp(torch.round(x / s), -128, 127) * s
        return x + (q - x).detach()

    def grid(self, x=None):
        return qcast.Grid(8, float(self._scale(x)), 0, signed=True)


def test_a_custom_pow2_quantizer_trains_with_qat_and_runs_on_int8_kernels(digits, float_model):
    f_acc, _ = digits.evaluate(float_model)
    config = QuantConfig(weight="test_qat_pow2", activation="test_qat_pow2", backend="torch")
    prepared = _qat(float_model, digits, config, epochs=2)
    qmodel = qcast.convert(prepared)
    acc, _ = digits.evaluate(qmodel)
    assert acc >= f_acc - 1.5, (acc, f_acc)
    qdqs = [m for m in qmodel.qcast_qdq.modules() if isinstance(m, QDQ)]
    assert qdqs and all(math.log2(m.qparams.scale).is_integer() for m in qdqs)
    kernels = [m for m in qmodel.graph_module.modules() if hasattr(m, "weight_scales")]
    assert kernels and all(math.log2(float(s)).is_integer() for k in kernels for s in k.weight_scales)
    _agrees(prepared, qmodel, digits.x[digits.test_idx])


def test_lsq_trains_the_scales(digits, float_model):
    prepared = qcast.prepare_qat(float_model, digits.calib[0], INT4, learnable_scales=True, freeze_bn_after=0)
    names = [n for n, _ in prepared.named_parameters() if n.endswith("fq.scale") or n.endswith("wq.scale")]
    assert len(names) >= 5, names
    before = {n: p.detach().clone() for n, p in prepared.named_parameters() if n in names}
    digits.train(prepared, epochs=1, lr=1e-3)
    after = dict(prepared.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in names), "every learned scale moved"
    qmodel = qcast.convert(prepared)
    _agrees(prepared, qmodel, digits.x[digits.test_idx])
    acc, _ = digits.evaluate(qmodel)
    assert acc >= digits.evaluate(float_model)[0] - 1.0


def test_batchnorm_statistics_freeze_after_the_chosen_step(digits, float_model):
    prepared = qcast.prepare_qat(float_model, digits.calib[0], INT4, freeze_bn_after=3)
    layer = next(m for m in prepared.modules() if isinstance(m, QATLayer) and m.bn is not None)
    stats = [layer.bn.running_mean.clone()]
    for _ in range(5):
        digits.train(prepared, epochs=1, lr=1e-3, steps=1)
        stats.append(layer.bn.running_mean.clone())
    moved = [not torch.equal(a, b) for a, b in zip(stats, stats[1:])]
    assert moved == [True, True, True, False, False], moved
    assert layer.bn_frozen and int(prepared.qcast_step) == 5
    # frozen: training mode computes the folded conv convert runs
    x = digits.x[:16]
    with torch.no_grad():
        prepared.freeze_observers()
        train_out = prepared.train()(x)
        eval_out = prepared.eval()(x)
    assert torch.allclose(train_out, eval_out, atol=1e-5)


def test_training_resumes_from_a_state_dict(digits, float_model):
    kw = dict(freeze_bn_after=4, freeze_observers_after=4, learnable_scales=True)
    a = qcast.prepare_qat(float_model, digits.calib[0], INT4, **kw)
    digits.train(a, epochs=1, lr=1e-2, opt="sgd", steps=6)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = qcast.prepare_qat(float_model, digits.calib[0], INT4, **kw)
    b.load_state_dict(torch.load(buf))
    x = digits.x[:32]
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    digits.train(a, epochs=1, lr=1e-2, opt="sgd", steps=2)
    digits.train(b, epochs=1, lr=1e-2, opt="sgd", steps=2)
    assert int(b.qcast_step) == 8 and all(m.bn_frozen for m in b.modules() if isinstance(m, QATLayer))
    with torch.no_grad():
        assert torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)
        assert torch.equal(qcast.convert(a)(x), qcast.convert(b)(x))


def test_a_quantizer_with_no_gradient_path_is_a_clear_error(digits, float_model):
    @qcast.register_quantizer("test_qat_round_only")
    class RoundOnly(qcast.FakeQuantizer):
        applies_to = "weight"

        def forward(self, w):
            s = w.detach().abs().max() / 127
            return torch.round(w / s) * s  # round has a zero gradient: nothing reaches w

        def grid(self, w=None):
            return qcast.Grid(8, float(w.abs().max() / 127))

    # raised by prepare_qat itself (its checked training-mode pass), before any torch.compile could hide it
    with pytest.raises(QcastError, match=r"'test_qat_round_only' at conv1 \(weight\).*no gradient path.*"
                                         r"straight-through"):
        qcast.prepare_qat(float_model, digits.calib[0], QuantConfig(weight="test_qat_round_only"))


def test_qat_runs_under_autocast(digits, float_model):
    prepared = qcast.prepare_qat(float_model, digits.calib[0], INT4)
    x, y = digits.x[:64], digits.y[:64]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(prepared(x), y)
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in prepared.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qat_on_cuda(digits, float_model):
    import copy
    model = copy.deepcopy(float_model).cuda()
    prepared = qcast.prepare_qat(model, digits.calib[0].cuda(), INT4, freeze_bn_after=100)
    assert all(p.device.type == "cuda" for p in prepared.parameters())
    cuda = Digits()
    cuda.x, cuda.y = digits.x.cuda(), digits.y.cuda()
    cuda.train(prepared, epochs=2, lr=1e-3)
    qmodel = qcast.convert(prepared)
    acc, _ = digits.evaluate(qmodel)
    assert acc >= digits.evaluate(float_model)[0] - 1.0
    with torch.no_grad():
        assert sqnr(prepared.eval()(digits.x[:64].cuda()).cpu(), qmodel(digits.x[:64])) >= 40


def test_simulate_is_the_qdq_graph_convert_lowers(digits, float_model):
    config = QuantConfig(weight="int4", activation="int8_sym", rounding="nearest", backend="torch")
    sim = qcast.simulate(float_model, digits.calib, config)
    qmodel = qcast.quantize(float_model, digits.calib, config=config, progress=False, check_speed=False)
    x = digits.x[digits.test_idx]
    with torch.no_grad():
        assert torch.equal(sim(x), qmodel.qcast_qdq(x))
        assert sqnr(sim(x), qmodel(x)) >= 30


def test_a_converted_qat_model_saves_and_loads(digits, float_model, tmp_path):
    prepared = _qat(float_model, digits, epochs=1)
    qmodel = qcast.convert(prepared)
    qcast.save(qmodel, tmp_path / "qat.qcast")
    back = qcast.load(tmp_path / "qat.qcast", backend="torch")
    x = digits.x[:64]
    with torch.no_grad():
        assert torch.equal(qmodel(x), back(x))


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_converted_qat_model_runs_on_the_engine_backends(digits, float_model, backend):
    pytest.importorskip(backend)
    config = QuantConfig(weight="test_qat_pow2", activation="int8", backend="torch")
    prepared = _qat(float_model, digits, config, epochs=1)
    qmodel = qcast.convert(prepared, backend=backend)
    assert qmodel.qcast_meta["backend"] == backend
    _agrees(prepared, qmodel, digits.x[digits.test_idx])


@pytest.mark.parametrize("backend", ["torch", "openvino", "onnxruntime"])
@pytest.mark.parametrize("lsq", [False, True], ids=["observed", "lsq"])
def test_grouped_int4_qat_converts_to_what_it_trained(digits, float_model, backend, lsq):
    """Grouped int4 weights (a scale per 18 / 32 inputs) are re-rounded onto the per-channel int8 grid the kernels
    take; QAT trains on that grid, so the converted model matches its QAT simulation on every backend (measured:
    143 dB on torch, 50-56 dB on the engines; 44-46 dB everywhere when convert alone re-rounded)."""
    if backend != "torch":
        pytest.importorskip(backend)
    config = QuantConfig(weight="int4", backend="torch",
                         per_layer={"conv2": {"weight_group_size": 18}, "fc": {"weight_group_size": 32}})
    prepared = _qat(float_model, digits, config, epochs=1, learnable_scales=lsq)
    qmodel = qcast.convert(prepared, backend=backend)
    assert qmodel.qcast_meta["backend"] == backend
    _agrees(prepared, qmodel, digits.x[digits.test_idx])
    grouped = {m.name: m for m in prepared.modules() if isinstance(m, QATLayer) and m.wq.group_size}
    assert sorted(grouped) == ["conv2", "fc"], sorted(grouped)
    # what the layer trains with: the int4 groups re-rounded onto the per-channel int8 grid, each weight at most half
    # an int8 step from its group's int4 value
    layer = grouped["fc"]
    w, _ = layer.folded()
    with torch.no_grad():
        y = layer.wq(w)
    step = y.abs().amax(dim=1, keepdim=True) / 127
    ints = y / step
    assert torch.allclose(ints, ints.round(), atol=1e-3)
    if not lsq:
        from qcast.schemes import weight_grid
        g4, _ = weight_grid(w, qcast.SCHEMES["int4"], 7, 32)
        assert bool(((y - g4).abs() <= step / 2 + 1e-7).all())


def _cpp_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 - no toolchain: inductor cannot build its CPU kernels
        return None


@pytest.mark.skipif(_cpp_compiler() is None, reason="torch.compile's inductor needs a C++ compiler (none found)")
def test_a_qat_model_trains_under_torch_compile_as_in_eager(digits, float_model):
    """A compiled training step computes what the eager one does (int4 weights, LSQ scales, BatchNorm and observers
    freezing mid-run), with one graph break (the step count) and a recompile per freeze only. Measured: the first
    step's loss is bit-equal, later ones drift by 1e-5..6e-2 relative (inductor's fused float arithmetic flips a
    few roundings, which training then amplifies, in every variant), so the steps after the first are compared on
    the trained model's accuracy."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters
    x, y = digits.x[digits.train_idx[:64]], digits.y[digits.train_idx[:64]]
    eager = qcast.prepare_qat(float_model, x, QuantConfig(weight="int4"), learnable_scales=True,
                              freeze_bn_after=3, freeze_observers_after=2)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(compiled_model)
    losses, grads = {}, {}
    for key, model, fn in (("eager", eager, eager), ("compiled", compiled_model, step)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses[key] = []
        for i in range(6):
            loss = nn.functional.cross_entropy(fn(x), y)
            opt.zero_grad()
            loss.backward()
            if i == 0:
                grads[key] = [p.grad.clone() for p in model.parameters()]
            opt.step()
            losses[key].append(loss.item())
    assert losses["compiled"][0] == pytest.approx(losses["eager"][0], rel=1e-6)
    # the weights' and BatchNorms' gradients agree to 0.5-0.9% (measured; a conv bias before a BatchNorm and the
    # LSQ scales get sums that cancel to ~0, where inductor's reduction order leaves 1e-6..1e-4 of residue)
    for (name, _), a, b in zip(eager.named_parameters(), grads["eager"], grads["compiled"]):
        if name.endswith("layer.weight") or ".bn." in name:
            assert float((a - b).norm() / a.norm()) < 2e-2, name
    assert losses["compiled"][-1] < losses["compiled"][0]
    # no recompile per step: one graph, recompiled when the observers and then the BatchNorms freeze
    assert counters["stats"]["unique_graphs"] <= 4
    acc_eager, _ = digits.evaluate(qcast.convert(eager, backend="torch"))
    acc_compiled, _ = digits.evaluate(qcast.convert(compiled_model, backend="torch"))
    assert abs(acc_eager - acc_compiled) <= 1.0
