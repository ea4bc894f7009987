"""The quantized model at inference: what it refuses and how it says so (NaN/Inf, devices, dtypes, channels), its
speed against float, and what a user sees on stderr."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qcast
from qcast import InputError, UnsupportedError
from qcast.report.speed import SlowerThanFloatWarning, SpeedCheck, warn_if_slower
from tests.helpers import quantize_small, run_isolated, sqnr


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return quantize_small(SmallCNN().eval(), (2, 3, 8, 8))


# ------------------------------------------------------------------------------------------------
# NaN / Inf: the float model shows them, so the int8 model must not hide them
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_input_is_an_input_error_naming_the_input_and_the_rows(small, bad):
    x = torch.randn(4, 3, 8, 8)
    x[2, 1, 3, 3] = bad
    with torch.no_grad():
        assert not torch.isfinite(small.model(x)).all()  # the float model propagates it
        with pytest.raises(InputError) as e:
            small.qmodel(x)
    msg = str(e.value)
    assert "input 0" in msg and "1 NaN/Inf" in msg and "row(s) [2]" in msg and "nan_to_num" in msg, msg


def test_a_non_finite_keyword_input_is_named_by_its_keyword():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = TwoInputs().eval()
    qmodel = qcast.quantize(model, [{"x": torch.randn(2, 4), "y": torch.randn(2, 4)} for _ in range(4)],
                            progress=False, check_speed=False)
    y = torch.randn(2, 4)
    y[0, 0] = float("nan")
    with pytest.raises(InputError, match="input 'y'"):
        qmodel(x=torch.randn(2, 4), y=y)


def test_finite_inputs_whose_sum_overflows_are_accepted(small):
    """The check sums each input (one pass); a sum can overflow to inf on finite data: the exact check decides."""
    x = torch.full((2, 3, 8, 8), 3e37)
    assert not torch.isfinite(x.sum())
    with torch.no_grad():
        assert torch.isfinite(small.qmodel(x)).all()


# ------------------------------------------------------------------------------------------------
# what runs where: CPU only today, and the error says so
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("move", [lambda m: m.cuda(), lambda m: m.to("cuda"), lambda m: m.to(torch.device("cuda", 0)),
                                  lambda m: m.to("cuda", torch.float32), lambda m: m.xpu()],
                         ids=["cuda()", "to('cuda')", "to(device)", "to('cuda', dtype)", "xpu()"])
def test_moving_the_model_off_the_cpu_is_an_error_that_says_what_runs_where(small, move):
    with pytest.raises(UnsupportedError) as e:
        move(small.qmodel)
    msg = str(e.value)
    assert "CPU" in msg and "qnnpack" in msg and "quantization-aware training" in msg, msg
    with torch.no_grad():  # and the model still works
        assert torch.equal(small.qmodel(small.x), small.out)


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()])
def test_casting_the_model_is_an_error(small, cast):
    with pytest.raises(UnsupportedError, match="float32"):
        cast(small.qmodel)


def test_cpu_and_float32_moves_are_no_ops(small):
    assert small.qmodel.cpu() is small.qmodel and small.qmodel.to("cpu", torch.float32) is small.qmodel
    with torch.no_grad():
        assert torch.equal(small.qmodel(small.x), small.out)


def test_an_input_on_another_device_is_an_input_error(small):
    with pytest.raises(InputError, match="is on meta.*CPU"):
        small.qmodel(torch.empty(2, 3, 8, 8, device="meta"))


# ------------------------------------------------------------------------------------------------
# inputs that do not fit: the layer, what it expected and what it got, without engine jargon
# ------------------------------------------------------------------------------------------------
def test_a_wrong_channel_count_names_expected_and_received_channels(small):
    with pytest.raises(InputError) as e:
        small.qmodel(torch.randn(1, 4, 8, 8))
    msg = str(e.value)
    assert "at conv (conv2d)" in msg and "expects 3 input channels (dim 1), got 4" in msg, msg
    assert "primitive descriptor" not in msg


def test_a_spatial_size_that_changes_a_linear_width_names_the_features(small):
    with pytest.raises(InputError) as e:
        small.qmodel(torch.randn(1, 3, 9, 9))
    msg = str(e.value)
    assert "at fc (linear)" in msg and "expects 288 input features (last dim), got 392" in msg, msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.float64])
def test_a_wrong_dtype_says_to_pass_float32(small, dtype):
    with pytest.raises(InputError, match=r"float32.*x\.float\(\)"):
        small.qmodel(torch.randn(1, 3, 8, 8).to(dtype))


def test_a_bad_input_prints_nothing_on_stderr_before_the_error(small, capfd):
    """torch.fx's GraphModule prints its generated code's traceback on any error; qcast's InputError says it all."""
    for bad in (torch.randn(1, 3, 8, 8).long(), torch.randn(1, 3, 8, 8).half(), torch.randn(1, 4, 8, 8)):
        with pytest.raises(InputError):
            small.qmodel(bad)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == "", captured.err[:500]


def test_the_python_api_prints_no_torch_deprecation_notice():
    """PyTorch 2.13 deprecates quantized tensors, which the torch backend creates by design: a user of the Python API
    (with Python's default warning filters) does not see that notice on every run."""
    done = run_isolated("""
        import torch, qcast
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
        q = qcast.quantize(m, [torch.randn(2, 3, 12, 12) for _ in range(4)], progress=False, check_speed=False)
        with torch.no_grad():
            q(torch.randn(1, 3, 12, 12))
        print("ok")
    """, warnings="default")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "deprecated" not in done.stderr, done.stderr


# ------------------------------------------------------------------------------------------------
# speed against float, measured when quantize finishes
# ------------------------------------------------------------------------------------------------
def test_an_int8_model_slower_than_float_is_reported_with_the_figures():
    """Seed 002's attention block at (1, 16, 128): measured 0.34-0.4x the speed of float on PyTorch's int8 kernels
    (each int8 op's fixed cost outweighs the arithmetic it saves), a margin far above timing noise."""
    from tests.models.vit import Attention
    torch.manual_seed(0)
    block = Attention(128, num_heads=4, qkv_bias=True).eval()
    with pytest.warns(SlowerThanFloatWarning, match=r"slower than the float model.*Tensor\[1, 16, 128\].*ms vs"):
        qmodel = qcast.quantize(block, [torch.randn(1, 16, 128) for _ in range(4)], progress=False)
    speed = qmodel.qcast_meta["speed"]
    assert speed["int8_ms"] > speed["float_ms"] > 0 and speed["repeats"] >= 2
    assert speed["input"] == "(Tensor[1, 16, 128]:float32)"


def test_the_speed_warning_fires_only_beyond_the_noise_tolerance():
    with pytest.warns(SlowerThanFloatWarning, match=r"1\.300 ms vs 1\.000 ms \(0\.77x"):
        warn_if_slower(SpeedCheck(float_ms=1.0, int8_ms=1.3, repeats=5, input="(Tensor[1, 3]:float32)"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_slower(SpeedCheck(float_ms=1.0, int8_ms=1.04, repeats=5, input="x"))  # within timing noise
        warn_if_slower(SpeedCheck(float_ms=1.0, int8_ms=0.3, repeats=5, input="x"))


def test_the_speed_check_leaves_a_training_mode_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())  # training mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qcast.quantize(model, [torch.randn(2, 3, 8, 8) for _ in range(3)], progress=False)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
