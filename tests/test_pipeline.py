"""End-to-end: the zoo's CNNs quantized in one call, against the float model as the oracle."""
import copy

import pytest
import torch

import qcast
from qcast.report import sqnr
from tests.models import ZOO, flatten_output, randomize_bn_stats, seed_everything

# measured on this machine (output SQNR, dB, min over 3 held-out batches): resnet18 31.9, resnet50 ~33,
# vgg16_bn 28.6, cifar_vgg_bn ~35, tsn_r50 34.2, blazeface 35.5, mobilenet_v2 37.7
CNNS = {"resnet18": 28, "resnet50": 28, "vgg16_bn": 25, "cifar_vgg_bn": 30, "tsn_r50": 30, "blazeface": 30,
        "mobilenet_v2": 32, "multitask_dict": 33, "detector_dataclass": 30}


def _build(name):
    seed_everything(0)  # weights must not depend on which tests ran before
    fac, inp = ZOO[name]
    m = fac().eval()
    randomize_bn_stats(m, 0)
    return m, inp


@pytest.mark.parametrize("name", sorted(CNNS))
def test_zoo_cnn_int8_and_faithful(name):
    m, inp = _build(name)
    before = copy.deepcopy(m.state_dict())
    q = qcast.quantize(m, [inp(batch=2, seed=s) for s in range(8)], progress=False)
    rows = qcast.explain(q)
    convs = [r for r in rows if r.op in ("conv1d", "conv2d", "linear")]
    assert convs and all(r.precision == "int8" for r in convs), [r for r in convs if r.precision != "int8"]
    for s in (50, 51):
        x = inp(batch=2, seed=s)
        with torch.no_grad():
            ref, out = m(x), q(x)
        assert type(ref) is type(out)
        for a, b in zip(flatten_output(ref), flatten_output(out)):
            assert b.dtype == torch.float32 and not b.is_quantized
            assert sqnr(a, b) > CNNS[name], (name, sqnr(a, b))
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_untraceable_region_stays_float_rest_int8():
    m, inp = _build("user_unet")
    q = qcast.quantize(m, [inp(batch=2, seed=s) for s in range(6)], progress=False)
    rows = {r.name: r for r in qcast.explain(q)}
    assert rows["gate"].precision == "float" and "x.mean() > 0" in rows["gate"].reason
    assert rows["gate.conv_pos"].precision == "float" and "uncaptured region 'gate'" in rows["gate.conv_pos"].reason
    int8_convs = [r for r in rows.values() if r.op == "conv2d" and r.precision == "int8"]
    all_convs = [r for r in rows.values() if r.op == "conv2d"]
    assert len(int8_convs) / len(all_convs) >= 0.7
    x = inp(batch=2, seed=40)
    with torch.no_grad():
        assert sqnr(m(x), q(x)) > 25  # measured 30.9


def test_detector_other_resolution_and_batch():
    m, inp = _build("blazeface")
    q = qcast.quantize(m, [inp(batch=2, seed=s) for s in range(6)], progress=False)
    x = torch.randn(3, 3, 256, 256)
    with torch.no_grad():
        ref, out = m(x), q(x)
    for a, b in zip(ref, out):
        assert a.shape == b.shape and sqnr(a, b) > 25


def test_residual_add_fused_and_accumulator_not_corrupted():
    m, inp = _build("resnet18")
    q = qcast.quantize(m, [inp(batch=2, seed=s) for s in range(6)], progress=False)
    rows = qcast.explain(q)
    assert any("add+relu" in r.reason for r in rows if r.op == "conv2d")
    assert not any(r.op == "add" for r in rows)  # every residual add runs inside the conv kernel
    report = qcast.compare(m, q, [inp(batch=2, seed=s) for s in (20, 21)])
    # every op's accumulated SQNR must be sane (an overwritten accumulator showed up as < 0 dB)
    assert min(r.sqnr for r in report.layers) > 25, report.table(5)
    assert report.layers == tuple(sorted(report.layers, key=lambda r: r.sqnr))


def test_global_engine_restored():
    engine = torch.backends.quantized.engine
    m, inp = _build("mobilenet_v2")
    q = qcast.quantize(m, [inp(batch=2, seed=s) for s in range(3)], progress=False)
    with torch.no_grad():
        q(inp(batch=1, seed=3))
    assert torch.backends.quantized.engine == engine


def test_errors_are_clear():
    m, inp = _build("cifar_vgg_bn")
    with pytest.raises(qcast.CalibrationError, match="no batches"):
        qcast.quantize(m, [], progress=False)
    bad = inp(batch=2, seed=0)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(qcast.CalibrationError, match="NaN"):
        qcast.quantize(m, [bad], progress=False)
    with pytest.raises(qcast.InputError):
        qcast.quantize(m, [torch.randn(2, 5, 32, 32)], progress=False)
    observed = qcast.prepare(m, inp(batch=2, seed=0))
    with pytest.raises(qcast.NotCalibratedError, match="calibrate"):
        qcast.convert(observed)
    q = qcast.quantize(m, [inp(batch=2, seed=s) for s in range(3)], progress=False)
    with pytest.raises(qcast.InputError, match="features"):
        q(torch.randn(1, 4, 32, 32))
    with pytest.raises(qcast.ConfigError, match="bogus"):
        qcast.QuantConfig.from_dict({"bogus": 1})


def test_digits_demo_model_accuracy_kept():
    from qcast.demo_data import accuracy, calibration_batches, load_digits_split, train_digits_cnn
    data = load_digits_split(0)
    m = train_digits_cnn(0, data=data, epochs=4)
    q = qcast.quantize(m, calibration_batches(data[0], 32, 8), progress=False)
    acc_f, acc_q = accuracy(m, data[2], data[3]), accuracy(q, data[2], data[3])
    assert acc_f > 0.95
    assert acc_q >= acc_f - 0.005  # measured: identical accuracy (99.44% both at 8 epochs)


def test_cli_ops_lists_registry(capsys):
    from qcast.cli import main
    from qcast.backends.torch.kernels import kernels
    assert main(["ops"]) == 0
    out = capsys.readouterr().out
    for k in kernels("torch"):
        assert k.op in out
