"""QuantConfig: what to quantize and how, as a frozen dataclass with a JSON round-trip.

Per-layer control is by module-path glob (``"layer4.*"``, ``"classifier"``) or op name
(``"add"``, ``"linear"``) in ``skip`` (kept in float) and ``per_layer`` (overrides).
Unknown keys are an error, never silently ignored; so is a pattern that matches no op of the model (at prepare).
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import json
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .errors import ConfigError

# the built-in names; QuantConfig also accepts any scheme registered since (qcast/schemes.py, qcast.register_quantizer)
WEIGHT_SCHEMES = ("int8", "int4", "pow2")
ACTIVATION_SCHEMES = ("auto", "int8", "float", "dynamic", "uint8", "int8_sym", "pow2")
ENGINES = ("auto", "onednn", "x86", "fbgemm", "qnnpack")
ROUNDINGS = ("auto", "nearest", "adaround")
# keys a per_layer override may set
OVERRIDE_KEYS = ("activation", "calibration", "engine", "weight", "weight_bits", "weight_group_size", "rounding",
                 "smoothquant")


def estimators() -> tuple[str, ...]:
    """The range estimators ``calibration=`` accepts: the built-ins and any registered with
    ``qcast.observers.register_estimator`` (looked up when a config is made, so registering first is enough)."""
    from .observers import ESTIMATORS
    return tuple(ESTIMATORS)


def _check_keys(keys, known, what: str = "QuantConfig") -> None:
    """ConfigError for keys not in ``known``, with the known keys and the close matches of each unknown one."""
    unknown = sorted(set(keys) - set(known))
    if not unknown:
        return
    hints = [f"{k!r} -> did you mean {' or '.join(map(repr, m))}?" for k in unknown
             if (m := difflib.get_close_matches(k, sorted(known), n=2))]
    raise ConfigError(f"unknown key(s) {unknown} in {what}" + (f" ({'; '.join(hints)})" if hints else "")
                      + f"; known keys: {sorted(known)}")


def _freeze_overrides(per_layer: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    out = {}
    for glob, over in dict(per_layer).items():
        if not isinstance(over, Mapping):
            raise ConfigError(f"per_layer[{glob!r}] must be a mapping of overrides, got {type(over).__name__}")
        _check_keys(over, OVERRIDE_KEYS, f"per_layer[{glob!r}]")
        out[str(glob)] = MappingProxyType(dict(over))
    return MappingProxyType(out)


@dataclass(frozen=True)
class QuantConfig:
    """How qcast quantizes a model.

    Attributes:
        skip: module-path globs or op names kept in float (e.g. ``["head.*", "softmax"]``).
        weight: weight scheme (``qcast/schemes.py``): ``"int8"`` (default: per-channel symmetric int8), ``"int4"``
            (per-channel symmetric 4-bit, i.e. ``weight_bits=4``; per group with ``weight_group_size``), ``"pow2"``
            (int8 with power-of-two scales), or a name registered with ``@qcast.register_quantizer``. Fewer-bit and
            power-of-two weights are stored on their grid inside int8 and run on the int8 kernels (explain() says so).
        weight_group_size: one weight scale per this many consecutive inputs of an output channel (None: one per
            channel). The grouped weight is re-rounded onto the per-channel int8 grid the kernels take.
        weight_bits: 2..8 (default 8): weights on a per-channel symmetric grid ``[-(2^(b-1)-1), 2^(b-1)-1]`` with
            scale ``max|w| / (2^(b-1)-1)``, stored in int8, so every kernel still runs int8.
        rounding: how weights are rounded onto that grid: ``"nearest"``, ``"adaround"`` (learned up/down
            rounding minimising each layer's output error on the calibration data, ``qcast.adaround``; costs
            seconds to minutes) or ``"auto"`` (default): AdaRound for layers with ``weight_bits < 8``, nearest at
            8 bits, where it gains less and costs the same (measured in docs/design.md).
        adaround_iters: optimisation steps per layer for AdaRound.
        activation: activation scheme: ``"auto"`` (default: static calibrated int8, except linear layers on token
            sequences, inputs of 3+ dims, which quantize per token at run time), ``"int8"`` (static everywhere),
            ``"dynamic"`` (every linear per token, ``qcast/backends/torch/kernels/dynamic.py``; other ops static) or ``"float"``.
        calibration: range estimator for activations: ``minmax``, ``ema``, ``percentile``, ``mse`` (default),
            ``kl`` (entropy calibration), or a name registered with ``qcast.observers.register_estimator``.
        percentile: the percentile used by the ``percentile`` estimator.
        engine: int8 engine for conv/linear: ``auto`` (chosen per layer, accuracy first), or a fixed one.
        per_layer: mapping glob/op -> overrides of ``activation``, ``calibration``, ``engine``.
        backend: who executes the quantized graph: ``"auto"`` (default: every installed backend is checked against the
            QDQ simulation and timed on the first calibration batch, the fastest is kept), ``"torch"`` (PyTorch's int8
            kernels, nothing to install), ``"openvino"`` (``pip install "qcast[openvino]"``) or ``"onnxruntime"``
            (``pip install "qcast[onnxruntime]"``; prepared for it, residual adds are not fused into the conv before
            them, so ORT can run both in int8). The environment variable ``QCAST_BACKEND`` changes the default (e.g.
            ``QCAST_BACKEND=torch``, as the test-suite does).
        bias_correction: correct each int8 conv/linear bias for the mean output shift its weight rounding causes,
            ``(W_q - W) E[x]`` with ``E[x]`` the per-input-channel mean seen during calibration (default on:
            +0.0..+4.3 dB output SQNR measured on every CNN, docs/design.md).
        equalize: cross-layer equalization before quantization (``qcast.passes.equalize``): consecutive
            conv/linear layers get matching per-channel weight ranges by a per-channel rescaling that keeps the
            float function; relu6 pairs are left alone. Default off, by measurement (docs/design.md): per-channel
            weights leave it little to fix on real weights (-1.0..+0.5 dB); it restores models whose activation
            ranges differ wildly by channel (10.8 -> 42.8 dB on a MobileNetV2 built that way).
        smoothquant: SmoothQuant (``qcast.smooth``): each int8 linear whose input has outlier channels gets its
            input divided per channel by ``s = max|X|^alpha / max|W|^(1-alpha)`` (a float multiply before it) and
            its weight columns multiplied by ``s``; the scales are chosen by ``calibrate()``. A migration strength
            ``alpha`` in (0, 1) (every linear), ``"auto"`` (default: ``qcast.smooth.AUTO_ALPHA`` on linears on token
            sequences, inputs of 3+ dims; CNN classifier heads are left alone) or None/False (off). Chosen by
            measurement, docs/design.md.
    """

    skip: tuple[str, ...] = ()
    weight: str = "int8"
    weight_bits: int = 8
    weight_group_size: int | None = None
    rounding: str = "auto"
    adaround_iters: int = 1000
    activation: str = "auto"
    calibration: str = "mse"
    percentile: float = 99.99
    engine: str = "auto"
    per_layer: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    backend: str = field(default_factory=lambda: os.environ.get("QCAST_BACKEND", "auto"))
    bias_correction: bool = True
    equalize: bool = False
    smoothquant: float | str | None = "auto"

    def __post_init__(self):
        if isinstance(self.skip, str):
            raise ConfigError("QuantConfig.skip must be a list of globs/op names, not a single string: "
                              f"use skip=[{self.skip!r}]")
        object.__setattr__(self, "skip", tuple(str(s) for s in self.skip))
        object.__setattr__(self, "per_layer", _freeze_overrides(self.per_layer))
        from . import schemes
        schemes.check_name("weight", self.weight, "weight")
        schemes.check_name("activation", self.activation, "activation")
        self._check_group("weight_group_size", self.weight_group_size)
        self._check("calibration", self.calibration, estimators())
        self._check("engine", self.engine, ENGINES)
        self._check("rounding", self.rounding, ROUNDINGS)
        self._check_bits("weight_bits", self.weight_bits)
        if isinstance(self.adaround_iters, bool) or not isinstance(self.adaround_iters, int) or self.adaround_iters < 1:
            raise ConfigError(f"QuantConfig.adaround_iters must be a positive integer, got {self.adaround_iters!r}")
        for glob, over in self.per_layer.items():
            for key in ("weight", "activation"):
                if key in over:
                    schemes.check_name(f"per_layer[{glob!r}].{key}", over[key], key)
            if "weight_group_size" in over:
                self._check_group(f"per_layer[{glob!r}].weight_group_size", over["weight_group_size"])
            for key, allowed in (("calibration", estimators()), ("engine", ENGINES)):
                if key in over:
                    self._check(f"per_layer[{glob!r}].{key}", over[key], allowed)
            if "rounding" in over:
                self._check(f"per_layer[{glob!r}].rounding", over["rounding"], ROUNDINGS)
            if "weight_bits" in over:
                self._check_bits(f"per_layer[{glob!r}].weight_bits", over["weight_bits"])
            if "smoothquant" in over:
                self._check_alpha(f"per_layer[{glob!r}].smoothquant", over["smoothquant"])
        if not isinstance(self.bias_correction, bool):
            raise ConfigError(f"QuantConfig.bias_correction must be true or false, got {self.bias_correction!r}")
        if not isinstance(self.equalize, bool):
            raise ConfigError(f"QuantConfig.equalize must be true or false, got {self.equalize!r}")
        if not (50.0 < float(self.percentile) <= 100.0):
            raise ConfigError(f"QuantConfig.percentile must be in (50, 100], got {self.percentile}")
        object.__setattr__(self, "smoothquant", self._check_alpha("smoothquant", self.smoothquant))

    def __hash__(self) -> int:
        # the generated dataclass hash would hash the per_layer mappingproxy (unhashable). __eq__ compares
        # per_layer as a dict (order-insensitive), so the hash freezes it into a frozenset of frozen items.
        per_layer = frozenset((glob, frozenset(over.items())) for glob, over in self.per_layer.items())
        return hash(tuple(per_layer if f.name == "per_layer" else getattr(self, f.name)
                          for f in dataclasses.fields(self)))

    def __reduce__(self):
        # copy.deepcopy and pickle (a whole QAT model saved with torch.save, or deep-copied before torch.compile)
        # cannot take the per_layer mappingproxy: rebuild from plain dicts, which __post_init__ freezes again
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        kwargs["per_layer"] = {glob: dict(over) for glob, over in self.per_layer.items()}
        return (_rebuild_config, (kwargs,))

    @staticmethod
    def _check(name: str, value: Any, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=1) if isinstance(value, str) else []
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if name.endswith("weight") and isinstance(value, str) and value.lstrip("iunt").isdigit() \
                    and value.lstrip("iunt") != "8":
                hint = f"; for {value.lstrip('iunt')}-bit weights use weight_bits={value.lstrip('iunt')} (stored in int8)"
            if name.endswith("calibration"):
                hint += " (other estimators can be registered with qcast.observers.register_estimator)"
            raise ConfigError(f"QuantConfig.{name}={value!r} is not one of {list(allowed)}{hint}")

    @staticmethod
    def _check_group(name: str, value: Any) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"QuantConfig.{name}={value!r} must be a positive integer (inputs per weight scale) or "
                              "None (one scale per output channel)")

    @staticmethod
    def _check_bits(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
            raise ConfigError(f"QuantConfig.{name}={value!r} must be an integer from 2 to 8 (weights are stored in "
                              "int8; 8 is the default)")

    @staticmethod
    def _check_alpha(name: str, value: Any) -> float | str | None:
        """A SmoothQuant alpha in (0, 1) as a float, ``"auto"``, or None (off; False is accepted for off)."""
        if value is None or value is False:
            return None
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
            raise ConfigError(f"QuantConfig.{name}={value!r} must be a migration strength alpha in (0, 1) (e.g. 0.5: "
                              "docs/design.md), 'auto' (token-sequence linears only) or None/False to turn SmoothQuant "
                              "off")
        return float(value)

    # -- matching -----------------------------------------------------------------------------------
    @staticmethod
    def _matches(pattern: str, name: str, op: str, module_path: str) -> bool:
        if pattern == op:
            return True
        return any(fnmatch.fnmatchcase(target, pattern) for target in {name, module_path} if target)

    def skipped_by(self, name: str, op: str, module_path: str = "") -> str | None:
        """The ``skip`` entry that keeps this op in float, or None."""
        for pattern in self.skip:
            if self._matches(pattern, name, op, module_path):
                return pattern
        return None

    def unmatched(self, ops: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
        """``(field, pattern)`` for each ``skip`` / ``per_layer`` pattern matching none of ``ops``
        (``(name, op, module_path)`` triples): a pattern that matches nothing is a typo, not a choice."""
        fields = [("skip", p) for p in self.skip] + [("per_layer", p) for p in self.per_layer]
        return [(f, p) for f, p in fields if not any(self._matches(p, *o) for o in ops)]

    def setting(self, key: str, name: str, op: str, module_path: str = "") -> Any:
        """The value of ``key`` for this op: the last matching per_layer override, else the global."""
        value = getattr(self, key)
        for pattern, over in self.per_layer.items():
            if key in over and self._matches(pattern, name, op, module_path):
                value = over[key]
        return value

    def weight_scheme(self, name: str, op: str, module_path: str = ""):
        """``(Scheme, bits, group_size)`` of this layer's weight: ``weight="int4"`` is 4 bits whatever
        ``weight_bits`` says unless it says another width than 8 or 4 (a ConfigError naming the layer)."""
        from . import schemes
        scheme = schemes.get(self.setting("weight", name, op, module_path))
        bits = int(self.setting("weight_bits", name, op, module_path))
        if not scheme.custom and scheme.bits != 8:
            if bits not in (8, scheme.bits):
                raise ConfigError(f"{name}: weight={scheme.name!r} is {scheme.bits}-bit but weight_bits={bits}; set one "
                                  "of them (weight='int8' with weight_bits, or the named scheme)")
            bits = scheme.bits
        return scheme, bits, self.setting("weight_group_size", name, op, module_path)

    def activation_scheme(self, name: str, op: str, module_path: str = ""):
        """The ``Scheme`` of this op's activations, or None for the modes (auto, int8, float, dynamic) that keep
        today's uint8 affine grid."""
        from . import schemes
        value = self.setting("activation", name, op, module_path)
        return schemes.get(value) if value in schemes.SCHEMES and value not in ("int8", "uint8") else None

    # -- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["skip"] = list(self.skip)
        d["per_layer"] = {k: dict(v) for k, v in self.per_layer.items()}
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"QuantConfig data must be a mapping, got {type(data).__name__}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"QuantConfig JSON is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "QuantConfig":
        _check_keys(changes, {f.name for f in dataclasses.fields(self)})
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "per_layer":
                if v:
                    parts.append(f"per_layer={ {k: dict(o) for k, o in v.items()} }")
            elif f.name == "skip":
                if v:
                    parts.append(f"skip={list(v)}")
            elif v != (f.default_factory() if f.default is dataclasses.MISSING else f.default):
                parts.append(f"{f.name}={v!r}")
        return "QuantConfig(" + ", ".join(parts) + ")"


def _checked_init(init):
    """QuantConfig(calibraton="mse") is the same ConfigError (known keys, close matches) as the typo in a dict or
    JSON config, not Python's TypeError for an unexpected keyword."""
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        _check_keys(kwargs, {f.name for f in dataclasses.fields(QuantConfig)})
        init(self, *args, **kwargs)
    return __init__


QuantConfig.__init__ = _checked_init(QuantConfig.__init__)


def _rebuild_config(kwargs: dict) -> QuantConfig:
    return QuantConfig(**kwargs)
