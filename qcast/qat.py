"""Quantization-aware training on qcast's own quantized graph, and simulation of any scheme.

``prepare_qat(model, example_inputs, config)`` is ``prepare`` (capture, fold, fuse, plan, observer points: the graph
``convert`` lowers) with every point made trainable:

* each observer becomes a ``QuantizerPoint`` that fake-quantizes its edge (``ActivationFakeQuant``: straight-through
  estimator; ``learnable_scales=True``: LSQ), or runs the user's registered quantizer where the config names one;
* each int8 conv/linear becomes a ``QATLayer`` reading its weight through a weight quantizer (``WeightFakeQuant``
  or the user's), with its BatchNorm kept: trained in batch-statistics mode and folded on the fly (Jacob et al.
  2018, as ``torch.ao``'s ConvBn: the weight is scaled by ``gamma / running_std`` before fake quantization, the
  output rescaled and normalised with the batch statistics), until ``freeze_bn_after`` steps, after which it computes
  exactly the folded conv ``convert`` runs.

No layer of the user's model is rewritten: the captured graph is (docs/qat.md). ``convert(prepared)`` folds the
trained BatchNorms, takes the trained grids and goes through the same ``to_qdq`` and backends as PTQ, so its
QuantizedModel computes what the QAT model computes in eval mode (up to the int8 kernels' own rounding).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .adaround import qmax_of
from .calibrate import calibrate
from .backends.context import int8_layers
from .errors import ConfigError, UnsupportedError
from .nn import FusedConv
from .observers import FixedQParamsObserver, Observer
from .passes._util import set_module
from .prepare import ObservedModel, as_config, prepare
from .quantizers import ActivationFakeQuant, FakeQuantizer, QuantizerPoint, WeightFakeQuant, check_output


class QATLayer(nn.Module):
    """A conv/linear trained through its weight quantizer ``wq``, with its BatchNorm (``bn``, or None) folded as it
    trains. ``bn_frozen`` (or eval mode): the BatchNorm's running statistics are folded in, exactly the conv that
    convert runs; before that, the batch statistics normalise the output and update the running ones."""

    def __init__(self, layer: nn.Module, wq: FakeQuantizer, bn: nn.Module | None = None, name: str = ""):
        super().__init__()
        self.layer, self.wq, self.bn, self.name = layer, wq, bn, name
        self.bn_frozen = False
        self.checked = self.grad_checked = False

    def _scale(self):
        bn = self.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
        return gamma / std

    def _op(self, x, w, b):
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, b)
        return self.layer._conv_forward(x, w, b)

    def _quantized(self, w):
        y = self.wq(w)
        need_grad = self.training and torch.is_grad_enabled() and w.requires_grad
        if torch.compiler.is_compiling():  # checked eagerly by prepare_qat (a check is a graph break and a sync)
            return y
        if not self.checked or (need_grad and not self.grad_checked):
            check_output(self.wq, w, y, f"{self.name} (weight)", need_grad=need_grad)
            self.checked, self.grad_checked = True, self.grad_checked or need_grad
        return y

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float weight and bias with the BatchNorm's running statistics folded in (what convert quantizes)."""
        w, b = self.layer.weight, self.layer.bias
        if self.bn is None:
            return w, b
        sf = self._scale()
        shape = (-1,) + (1,) * (w.dim() - 1)
        beta = self.bn.bias if self.bn.bias is not None else torch.zeros_like(sf)
        b0 = b if b is not None else torch.zeros_like(sf)
        return w * sf.reshape(shape), beta + (b0 - self.bn.running_mean) * sf

    def forward(self, x):
        if self.bn is None or self.bn_frozen or not self.training:
            w, b = self.folded()
            return self._op(x, self._quantized(w), b)
        # conv(x, q(w * sf)) / sf + b, computed as conv(x, q(w * sf) / sf, b): the same values (the conv is linear
        # in its weight), but the rescale and the bias are applied to the weight and by the conv's own bias add, not
        # as two more passes over the output (and four more in the backward; docs/qat.md, measured)
        sf = self._scale().reshape((-1,) + (1,) * (self.layer.weight.dim() - 1))
        w = self._quantized(self.layer.weight * sf) / sf
        return self.bn(self._op(x, w, self.layer.bias))

    def materialize(self) -> nn.Module:
        """A plain conv/linear holding the folded float weight and bias (for ``to_qdq``)."""
        out = copy.deepcopy(self.layer)
        w, b = self.folded()
        out.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        out.bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"{self.name!r}, bn={'frozen' if self.bn_frozen else ('training' if self.bn is not None else 'none')}"


class QATModel(ObservedModel):
    """What ``prepare_qat`` returns: train it like the float model, then ``qcast.convert`` it.

    ``freeze_bn()`` / ``freeze_observers()`` (also done automatically after ``freeze_bn_after`` /
    ``freeze_observers_after`` training steps; the step count is a buffer, so a state_dict round trip resumes it)."""

    def __init__(self, observed: ObservedModel, freeze_bn_after: int | None, freeze_observers_after: int | None):
        super().__init__(observed.gm, observed.qcast_config, observed.qcast_opaque, observed.qcast_input_names)
        self.freeze_bn_after, self.freeze_observers_after = freeze_bn_after, freeze_observers_after
        self.register_buffer("qcast_step", torch.zeros((), dtype=torch.long))
        self._step: int | None = 0

    def forward(self, *args, **kwargs):
        if self.training:
            self._count_step()
        return self.gm(*args, **kwargs)

    @torch.compiler.disable
    def _count_step(self) -> None:
        """The step count and the freezes it triggers, in Python (no device sync) and outside ``torch.compile``:
        compiled, each new count would be a recompile (an int attribute is a guard); the freezes recompile once."""
        if self._step is None:
            self._step = int(self.qcast_step)
        self._step += 1
        self.qcast_step.fill_(self._step)
        if self.freeze_bn_after is not None and self._step > self.freeze_bn_after:
            self.freeze_bn()
        if self.freeze_observers_after is not None and self._step > self.freeze_observers_after:
            self.freeze_observers()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._step = None  # read from the loaded buffer on the next training step

    def layers(self) -> list[QATLayer]:
        return [m for m in self.gm.modules() if isinstance(m, QATLayer)]

    def points(self) -> list[QuantizerPoint]:
        return [m for m in self.gm.modules() if isinstance(m, QuantizerPoint)]

    def freeze_bn(self) -> None:
        for layer in self.layers():
            layer.bn_frozen = True

    def freeze_observers(self) -> None:
        for p in self.points():
            p.observing = False

    def materialize(self) -> ObservedModel:
        """A calibrated ObservedModel on the CPU, for ``convert``: each QATLayer folded into a plain conv/linear, its
        trained weight quantizer in ``qcast_weight_quantizers``, the quantizer points as they are (``qparams()``
        from their grids)."""
        gm = copy.deepcopy(self.gm).cpu().eval()
        quantizers = {}
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            qat = mod.conv if isinstance(mod, FusedConv) else mod
            if not isinstance(qat, QATLayer):
                continue
            plain = qat.materialize()
            for k in ("qcast_fused",):
                if hasattr(qat.layer, k):
                    setattr(plain, k, getattr(qat.layer, k))
            if isinstance(mod, FusedConv):
                mod.conv = plain
            else:
                set_module(gm, node.target, plain)
            quantizers[node.target] = qat.wq
        sims = gm.meta.get("qcast_sim_weights", {})
        quantizers = {t: q for t, q in quantizers.items() if t not in sims}
        out = ObservedModel(gm, self.qcast_config, self.qcast_opaque, self.qcast_input_names)
        out.qcast_weight_quantizers = quantizers
        out.qcast_trained = True
        out.qcast_summary = self.qcast_summary
        return out


def _device(model: nn.Module) -> torch.device:
    t = next(iter(list(model.parameters()) + list(model.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


def _to(x: Any, device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def qat_config(config):
    """The config QAT trains under: no bias correction or AdaRound (training corrects the weights itself, and the
    converted model must compute what was trained), no SmoothQuant (its scales come from a calibration pass)."""
    config = as_config(config)
    if config.rounding == "adaround" or any(o.get("rounding") == "adaround" for o in config.per_layer.values()):
        raise ConfigError("QAT trains the weights on their grid, so rounding='adaround' has nothing to learn: use "
                          "rounding='nearest' or 'auto' with qcast.prepare_qat")
    if config.equalize:
        raise ConfigError("QuantConfig(equalize=True) is a post-training technique; QAT trains the ranges instead: "
                          "use equalize=False with qcast.prepare_qat")
    return config.replace(bias_correction=False, rounding="nearest", smoothquant=None)


def prepare_qat(model: nn.Module, example_inputs: Any, config=None, *, learnable_scales: bool = False,
                freeze_bn_after: int | None = None, freeze_observers_after: int | None = None) -> QATModel:
    """A trainable copy of ``model`` (untouched) quantized as ``config`` says, on ``model``'s device.

    ``learnable_scales``: activation and weight scales are parameters trained by LSQ; otherwise ranges are observed
    (running min/max, then a moving average) and weight scales follow the weights. ``freeze_bn_after``: training steps
    (forward calls in train mode) after which BatchNorm statistics are frozen and folded (None: never, until
    convert). ``freeze_observers_after``: likewise for the activation ranges. Train it in ``train()`` mode with any
    optimizer (under ``torch.autocast`` too), then ``qcast.convert(prepared)``.
    """
    device = _device(model)
    config = qat_config(config)
    cpu_model = copy.deepcopy(model).cpu() if device.type != "cpu" else model
    example = _to(example_inputs, "cpu")
    observed = prepare(cpu_model, example, config, keep_bn=True)
    gm = observed.gm
    _trainable_points(gm, learnable_scales)
    _trainable_layers(gm, config, learnable_scales)
    for p in gm.parameters():
        p.requires_grad_(True)
    qat = QATModel(observed, freeze_bn_after, freeze_observers_after)
    # one pass over the example (eval: BatchNorm statistics untouched) initialises every range
    points = qat.points()
    for p in points:
        p.active = False
    qat.eval()
    with torch.no_grad():
        from .data import as_call
        args, kwargs = as_call(example, "example_inputs")
        qat(*args, **kwargs)
    for p in points:
        p.active = True
    _check_training_step(qat, example)
    return qat.to(device).train()


def _check_training_step(qat: QATModel, example: Any) -> None:
    """One training-mode forward on the example, for the quantizer checks (shape, dtype, finiteness, a gradient
    path: ``check_output``) to run eagerly here rather than inside a ``torch.compile``d step, where they would break
    the graph; every buffer and step count is restored after it (BatchNorm statistics, observed ranges)."""
    from .data import as_call
    state = {k: v.detach().clone() for k, v in qat.state_dict().items()}
    args, kwargs = as_call(example, "example_inputs")
    qat.train()
    with torch.enable_grad():
        qat(*args, **kwargs)
    qat.load_state_dict(state)


def _trainable_points(gm: fx.GraphModule, learnable: bool) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        obs = gm.get_submodule(node.target)
        if not isinstance(obs, Observer) or isinstance(obs, QuantizerPoint):
            continue
        if isinstance(obs, FixedQParamsObserver):  # sigmoid / tanh outputs: fixed params, nothing to observe
            qp = obs.qparams()
            fq = ActivationFakeQuant(qp.qmin, qp.qmax)
            fq.scale.data.fill_(qp.scale), fq.zero_point.fill_(float(qp.zero_point))
            point = QuantizerPoint(obs.name, fq, qmax=qp.qmax)
            point.observing, point.batches = False, 1
        else:
            point = QuantizerPoint(obs.name, ActivationFakeQuant(obs.qmin, obs.qmax, obs.scheme, learnable), obs.qmax)
        setattr(gm, node.target, point)


def _trainable_layers(gm: fx.GraphModule, config, learnable: bool) -> None:
    from .convert import layer_schemes
    sources = gm.meta.get("qcast_bn_sources", {})
    sims = gm.meta.get("qcast_sim_weights", {})
    schemes = layer_schemes(gm, config)
    targets = dict(int8_layers(gm))
    for target in sims:
        mod = gm.get_submodule(target)
        targets[target] = mod.conv if isinstance(mod, FusedConv) else mod
    for target, layer in targets.items():
        if target in sims:
            wq = gm.get_submodule(sims[target])
        else:
            scheme, bits, group, name = schemes[target]
            wq = scheme.quantizer() if scheme.custom else WeightFakeQuant(scheme, qmax_of(bits), group, learnable)
        bn = None
        if target in sources:
            layer, bn = (copy.deepcopy(m) for m in sources[target])
            bn.train()
        qat = QATLayer(layer, wq, bn, name=target)
        mod = gm.get_submodule(target)
        if isinstance(mod, FusedConv):
            mod.conv = qat
        else:
            set_module(gm, target, qat)
    gm.meta.pop("qcast_bn_sources", None)


def simulate(model: nn.Module, calibration_data: Any, config=None, *, num_batches: int | None = None) -> fx.GraphModule:
    """``model`` with every quantizer the config names applied in float (any scheme, built-in or registered): the
    QDQ graph ``convert`` would lower, calibrated on ``calibration_data``, as a module on ``model``'s device. For
    research on schemes no int8 kernel runs; per-layer errors against float: ``qcast.compare(model,
    qcast.quantize(model, data, config=config, backend="torch"), data)``."""
    from .convert import to_qdq
    from .data import iter_calls
    device = _device(model)
    cpu_model = copy.deepcopy(model).cpu() if device.type != "cpu" else model
    calls = [(_to(a, "cpu"), _to(k, "cpu")) for a, k in iter_calls(calibration_data, None, num_batches)]
    if not calls:
        raise UnsupportedError("simulate() needs at least one calibration batch")
    args, kwargs = calls[0]
    observed = prepare(cpu_model, kwargs if kwargs and not args else (args[0] if len(args) == 1 else args), config)
    calibrate(observed, [k if k else a for a, k in calls], progress=False)
    return to_qdq(observed).to(device)
