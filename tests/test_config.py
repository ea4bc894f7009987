"""QuantConfig: validation, JSON round trip, and skip / per_layer as seen through explain()."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math

import pytest
import torch

import qcast
from qcast import ConfigError, QuantConfig
from tests.helpers import build_zoo, sqnr, zoo_calibration


def _resnet_quantized(config):
    model, input_fn = build_zoo("resnet18")
    qmodel = qcast.quantize(model, zoo_calibration(input_fn), config=config, progress=False)
    return model, qmodel, input_fn(batch=2, seed=10_000)


# ------------------------------------------------------------------------------------------------
# validation and JSON
# ------------------------------------------------------------------------------------------------
FULL = QuantConfig(skip=["layer4.*", "add"], calibration="percentile", percentile=99.9, engine="auto",
                   bias_correction=not QuantConfig().bias_correction,
                   per_layer={"fc": {"activation": "float"}, "layer1.*": {"engine": "onednn", "calibration": "minmax"}})


@pytest.mark.parametrize("config", [QuantConfig(), FULL], ids=["default", "full"])
def test_json_round_trip(config):
    text = config.to_json()
    data = json.loads(text)  # plain JSON, every field present
    assert set(data) == {f.name for f in dataclasses.fields(QuantConfig)}
    back = QuantConfig.from_json(text)
    assert back == config
    assert back.to_json() == text
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FULL.calibration = "minmax"
    with pytest.raises(TypeError):
        FULL.per_layer["fc"] = {"activation": "int8"}  # nested overrides are read-only too
    assert FULL.replace(calibration="mse").calibration == "mse" and FULL.calibration == "percentile"


def test_config_is_hashable():
    assert hash(FULL) == hash(QuantConfig.from_json(FULL.to_json()))


@pytest.mark.parametrize("call", [
    lambda: QuantConfig.from_json('{"calibration": "mse", "calibraton": "minmax"}'),
    lambda: QuantConfig.from_dict({"calibraton": "minmax"}),
    lambda: QuantConfig().replace(calibraton="minmax"),
    lambda: qcast.quantize(torch.nn.Conv2d(3, 3, 1), [torch.randn(1, 3, 4, 4)], config={"calibraton": "minmax"},
                           progress=False),
], ids=["from_json", "from_dict", "replace", "quantize(config=dict)"])
def test_unknown_key_is_a_config_error_naming_the_key(call):
    with pytest.raises(ConfigError, match="calibraton"):
        call()


def test_unknown_per_layer_key_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="precision"):
        QuantConfig(per_layer={"fc": {"precision": "float"}})
    with pytest.raises(ConfigError, match="fc"):
        QuantConfig(per_layer={"fc": "float"})


@pytest.mark.parametrize("kwargs,needle", [
    ({"calibration": "entropy"}, "calibration"),
    ({"per_layer": {"layer1.*": {"calibration": "entropy"}}}, "layer1"),
    ({"engine": "tensorrt"}, "engine"),
    ({"activation": "int4"}, "activation"),
    ({"weight": "int3"}, "weight"),
    ({"weight": "int8_sym"}, "is an? activation scheme, not a weight one"),
    ({"percentile": 120.0}, "percentile"),
    ({"skip": "layer4.*"}, "skip"),
    ({"bias_correction": "yes"}, "bias_correction"),
])
def test_bad_values_are_config_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        QuantConfig(**kwargs)
    assert isinstance(e.value, qcast.QcastError) and isinstance(e.value, ValueError)


def test_bad_estimator_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        QuantConfig.from_json('{"calibration": "entropy"}')
    assert all(name in str(e.value) for name in ("minmax", "ema", "percentile", "mse", "kl"))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_malformed_json_is_a_config_error(text):
    with pytest.raises(ConfigError):
        QuantConfig.from_json(text)


def test_config_of_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="QuantConfig"):
        qcast.quantize(torch.nn.Conv2d(3, 3, 1), [torch.randn(1, 3, 4, 4)], config="minmax", progress=False)


# ------------------------------------------------------------------------------------------------
# skip and per_layer, through explain()
# ------------------------------------------------------------------------------------------------
def test_skip_by_glob_keeps_those_layers_float():
    model, qmodel, x = _resnet_quantized(QuantConfig(skip=["layer4.*"]))
    rows = qcast.explain(qmodel)
    inside = [r for r in rows if r.name.startswith("layer4.")]
    assert {r.op for r in inside} >= {"conv2d", "add", "relu"}  # the block is not fused away while skipped
    for r in inside:
        assert r.precision == "float" and r.engine == "torch-float", r
        assert "layer4.*" in r.reason, r
    outside = [r for r in rows if r.op == "conv2d" and not r.name.startswith("layer4.")]
    assert len(outside) == 15 and all(r.precision == "int8" for r in outside)
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) >= 32.0  # measured 34.8 dB


def test_skip_by_op_name_keeps_every_such_op_float():
    model, qmodel, x = _resnet_quantized(QuantConfig(skip=["add"]))
    rows = qcast.explain(qmodel)
    adds = [r for r in rows if r.op == "add"]
    assert len(adds) == 8  # one residual add per BasicBlock, no longer fused into a conv
    for r in adds:
        assert r.precision == "float" and "'add'" in r.reason, r
    assert [r.name for r in adds][:2] == ["layer1.0:add", "layer1.1:add"]
    convs = [r for r in rows if r.op == "conv2d"]
    assert all(r.precision == "int8" and "add" not in r.reason for r in convs)
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) >= 31.0  # measured 34.2 dB


def test_skip_exact_module_path():
    model, qmodel, x = _resnet_quantized(QuantConfig(skip=["fc", "conv1"]))
    rows = {r.name: r for r in qcast.explain(qmodel)}
    assert rows["fc"].precision == "float" and "'fc'" in rows["fc"].reason
    assert rows["conv1"].precision == "float" and "'conv1'" in rows["conv1"].reason
    assert rows["layer1.0.conv1"].precision == "int8"  # 'conv1' is a path, not a glob matching every conv1
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) >= 32.0  # measured 35.3 dB


def test_per_layer_activation_float_and_calibration_override():
    config = QuantConfig(per_layer={"fc": {"activation": "float"}, "conv1": {"calibration": "minmax"}})
    model, qmodel, x = _resnet_quantized(config)
    rows = {r.name: r for r in qcast.explain(qmodel)}
    assert rows["fc"].precision == "float" and "activation" in rows["fc"].reason
    assert rows["conv1"].precision == "int8"
    estimators = {r.name: r.estimator for r in qmodel.qcast_meta["calibration_summary"].ranges}
    assert estimators["conv1"] == "minmax"
    assert estimators["layer1.0.conv1"] == "mse"  # everything else keeps the global estimator
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) >= 32.0  # measured 35.5 dB


def test_per_layer_last_matching_override_wins():
    config = QuantConfig(per_layer={"layer*": {"calibration": "minmax"}, "layer2.*": {"calibration": "percentile"}})
    assert config.setting("calibration", "layer1.0.conv1", "conv2d") == "minmax"
    assert config.setting("calibration", "layer2.0.conv1", "conv2d") == "percentile"
    assert config.setting("calibration", "fc", "linear") == "mse"
    assert fnmatch.fnmatchcase("layer2.0.conv1", "layer2.*")


def test_per_layer_engine_override():
    if "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("the x86 int8 engine is not in this torch build")
    config = QuantConfig(per_layer={"layer1.*.conv1": {"engine": "x86"}})
    model, qmodel, x = _resnet_quantized(config)
    rows = {r.name: r for r in qcast.explain(qmodel)}
    for name in ("layer1.0.conv1", "layer1.1.conv1"):
        assert rows[name].precision == "int8" and rows[name].engine == "x86", rows[name]
        assert "reduce_range" in rows[name].reason  # x86 needs 7-bit activations, and says so
    assert rows["layer2.0.conv1"].engine == "onednn"
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) >= 30.0  # measured 33.6 dB


def test_fixed_engine_on_residual_convs_is_int8_or_explained():
    if "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("the x86 int8 engine is not in this torch build")
    _, qmodel, _ = _resnet_quantized(QuantConfig(engine="x86"))
    for r in qcast.explain(qmodel):
        if r.op == "conv2d" and r.precision == "float":
            assert "onednn" in r.reason or "add" in r.reason, r


def test_x86_residual_convs_run_int8_with_a_separate_int8_add():
    """conv2d_add exists on onednn only: with engine='x86' the residual add is not fused into the conv."""
    if "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("the x86 int8 engine is not in this torch build")
    model, qmodel, x = _resnet_quantized(QuantConfig(engine="x86"))
    rows = qcast.explain(qmodel)
    convs = [r for r in rows if r.op in ("conv2d", "linear")]
    assert convs and all(r.precision == "int8" and r.engine == "x86" for r in convs), convs
    assert not [r for r in rows if "add" in r.reason.rsplit("fused ", 1)[-1].split("+")], "an add was fused on x86"
    adds = [r for r in rows if r.op == "add"]
    assert len(adds) == 8 and all(r.precision == "int8" for r in adds), adds  # one per BasicBlock
    assert all(r.reason for r in rows)
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) >= 28.0  # measured 30.9 dB (7-bit activations everywhere)


def test_pattern_that_matches_nothing_is_a_config_error_naming_it():
    model, input_fn = build_zoo("resnet18")
    x = input_fn(batch=1, seed=0)
    with pytest.raises(ConfigError, match=r"skip pattern 'layer5\.\*' matches no layer or op of ResNet") as e:
        qcast.prepare(model, x, QuantConfig(skip=["layer5.*"]))
    assert "layer4.1" in str(e.value), str(e.value)  # valid names close to the typo
    with pytest.raises(ConfigError, match=r"per_layer pattern 'fc\.weight'") as e:
        qcast.prepare(model, x, QuantConfig(per_layer={"fc.weight": {"activation": "float"}}))
    assert "['fc']" in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match=r"use 'layer1\.\*'"):  # a container's path matches no op itself
        qcast.prepare(model, x, QuantConfig(skip=["layer1"]))
    with pytest.raises(ConfigError, match=r"'softmax'.*'conv2d'"):  # an op the model does not have; lists its ops
        qcast.quantize(model, [x], config={"skip": ["softmax"]}, progress=False)


def test_pattern_naming_a_layer_inside_an_uncaptured_region_is_accepted():
    model, input_fn = build_zoo("user_unet")  # 'gate' cannot be captured; explain() lists gate.conv_pos
    observed = qcast.prepare(model, input_fn(batch=1, seed=0), QuantConfig(skip=["gate.conv_pos"]))
    assert observed.qcast_opaque and "gate" in observed.qcast_opaque


# ------------------------------------------------------------------------------------------------
# a typo is the same ConfigError however the config is written; estimators come from the registry
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: QuantConfig(calibraton="mse"),
    lambda: QuantConfig.from_dict({"calibraton": "mse"}),
    lambda: QuantConfig.from_json('{"calibraton": "mse"}'),
    lambda: QuantConfig().replace(calibraton="mse"),
], ids=["keyword", "dict", "json", "replace"])
def test_a_typo_in_a_key_is_the_same_config_error_with_the_close_match(call):
    with pytest.raises(ConfigError) as e:
        call()
    msg = str(e.value)
    assert "'calibraton'" in msg and "did you mean 'calibration'" in msg and "known keys" in msg, msg


def test_a_typo_in_a_per_layer_key_suggests_the_close_match():
    with pytest.raises(ConfigError, match="did you mean 'weight_bits'"):
        QuantConfig(per_layer={"fc": {"weight_bit": 4}})


@pytest.fixture
def pow2_estimator():
    """A user's estimator, registered for one test: min/max widened to a power-of-two scale."""
    from qcast.observers import ESTIMATORS, MinMaxObserver, QParams, register_estimator

    @register_estimator("pow2")
    class Pow2Observer(MinMaxObserver):
        def qparams(self):
            qp = super().qparams()
            scale = 2.0 ** math.ceil(math.log2(qp.scale))
            zp = int(round(-min(self.min_val, 0.0) / scale))
            return QParams(scale=scale, zero_point=min(max(zp, qp.qmin), qp.qmax), qmin=qp.qmin, qmax=qp.qmax)

    yield "pow2"
    del ESTIMATORS["pow2"]


def test_a_registered_estimator_is_accepted_and_used(pow2_estimator):
    config = QuantConfig(calibration=pow2_estimator, per_layer={"fc": {"calibration": "pow2"}})
    assert QuantConfig.from_json(config.to_json()) == config
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).eval()
    calib = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    observed = qcast.prepare(model, calib[0], QuantConfig(calibration="pow2"))
    qcast.calibrate(observed, calib, progress=False)
    scales = [obs.qparams().scale for _, obs in observed.observers()]
    assert scales and all(math.log2(s) == round(math.log2(s)) for s in scales), scales
    qmodel = qcast.convert(observed)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) >= 20.0


def test_an_unregistered_estimator_says_how_to_register_one():
    with pytest.raises(ConfigError, match="register_estimator") as e:
        QuantConfig(calibration="pow2")
    assert "'mse'" in str(e.value)


@pytest.mark.parametrize("kwargs,hint", [({"calibration": "mze"}, "'mse'"), ({"engine": "qnnpak"}, "'qnnpack'"),
                                         ({"rounding": "adaroud"}, "'adaround'"),
                                         ({"per_layer": {"fc": {"activation": "dynamc"}}}, "'dynamic'")])
def test_a_typo_in_a_value_suggests_the_close_match(kwargs, hint):
    with pytest.raises(ConfigError, match=f"did you mean {hint}"):
        QuantConfig(**kwargs)


def test_a_fewer_bit_weight_scheme_points_at_weight_bits():
    # int4 is a scheme of its own (tests/test_schemes.py); other widths are weight_bits
    with pytest.raises(ConfigError, match="for 3-bit weights use weight_bits=3"):
        QuantConfig(weight="int3")
