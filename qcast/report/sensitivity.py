"""sensitivity(model, data): each int8 layer's effect on the model output (or a user metric).

One calibration serves every layer. The calibrated model is converted to the QDQ graph (``to_qdq``: explicit
quantize->dequantize points and fake-quantized weights, run in float), and for each candidate layer the QDQ
points and weight fake-quant that belong to it are switched off or on:

* ``mode="float_one"``: everything quantized except this layer. Its weights go back to float, and so do the QDQ
  points no other int8 layer reads (the inputs only it reads). ``delta`` = metric with the layer in
  float minus the fully quantized metric: how much keeping it float helps.
* ``mode="quantize_one"``: only this layer quantized (its weights and the QDQ points on its inputs; its output is
  requantized only for an int8 reader, as in the real model).
  ``delta`` = float metric minus the metric with this layer alone quantized: how much it alone hurts. With the
  default metric the float model's SQNR against itself is infinite, so ``delta`` is then ``-value``: the
  output noise in dB (relative to the signal) this layer alone adds.

Rows are sorted most sensitive (largest ``delta``) first. Candidates are the int8 ops with their own calibrated
output params (``compute`` kind: conv, linear, add, mul, cat, hardswish, ...), named as ``qcast.explain()``
names them, so a name can go straight into ``QuantConfig(skip=[name])``.

Reports are cached in this process: a repeated call with the same model weights
(a hash of the state_dict bytes and the model class), the same data (shapes, dtypes and a hash of the bytes),
config (its JSON), mode, metric (the same function object), num_batches and input_fn returns the cached report
without running the model or the metric again; ``qcast.report.clear_sensitivity_cache()`` empties the cache.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..config import QuantConfig
from ..data import iter_calls, tensors_in
from ..errors import CalibrationError, ConfigError, EvalError, QcastError
from ..quantized import QDQ
from .compare import _db, _float, _leaves

MODES = ("float_one", "quantize_one")
SQNR_METRIC = "output SQNR (dB)"
_CACHE: "OrderedDict[tuple, SensitivityReport]" = OrderedDict()
_CACHE_SIZE = 16


@dataclass(frozen=True)
class SensitivityRow:
    """One candidate layer: the metric with it toggled (``value``) and the change that makes it sensitive (``delta``,
    larger = more sensitive)."""

    name: str
    op: str
    value: float
    delta: float

    def __repr__(self) -> str:
        return f"SensitivityRow({self.name!r}, {self.op}, value={self.value:.4g}, delta={self.delta:+.4g})"


@dataclass(frozen=True)
class SensitivityReport:
    """Per-layer sensitivity, most sensitive first. ``baseline``: the metric everything is compared with (fully
    quantized for ``float_one``, float for ``quantize_one``); ``quantized``/``float``: the metric of the fully
    quantized simulation and of the float model (all QDQ points off)."""

    mode: str
    metric: str
    baseline: float
    quantized: float
    float: float
    rows: tuple[SensitivityRow, ...]
    batches: int

    def __repr__(self) -> str:
        top = ", ".join(r.name for r in self.rows[:3])
        return (f"SensitivityReport(mode={self.mode!r}, metric={self.metric!r}, quantized={self.quantized:.4g}, "
                f"float={self.float:.4g}, layers={len(self.rows)}, most sensitive: [{top}])")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rows)

    def table(self, limit: int | None = None) -> str:
        rows = self.rows[:limit] if limit else self.rows
        w = max([len(r.name) for r in rows] + [5])
        what = "layer kept float" if self.mode == "float_one" else "layer alone int8"
        out = [f"{'layer':<{w}}  {'op':<14} {'metric (' + what + ')':>28} {'delta':>10}"]
        for r in rows:
            out.append(f"{r.name:<{w}}  {r.op:<14} {r.value:>28.4g} {r.delta:>+10.4g}")
        out.append(f"{self.metric}: fully int8 {self.quantized:.4g}, float {self.float:.4g}; mode {self.mode}, "
                   f"{len(self.rows)} layers, {self.batches} batch(es); most sensitive first")
        return "\n".join(out)

    def to_json(self, indent: int | None = 2) -> str:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        d = {k: clean(v) for k, v in asdict(self).items() if k != "rows"}
        d["rows"] = [{k: clean(v) for k, v in asdict(r).items()} for r in self.rows]
        return json.dumps(d, indent=indent)


def clear_cache() -> None:
    """Forget every cached sensitivity report."""
    _CACHE.clear()


# ------------------------------------------------------------------------------------------------
# the switchable simulation
# ------------------------------------------------------------------------------------------------
class _SwitchQDQ(QDQ):
    """A QDQ point that can be switched off (identity)."""

    def __init__(self, qdq: QDQ):
        super().__init__(qdq.qparams, qdq.name)
        self.on = True

    def forward(self, x):
        return self.qparams.fake_quant(x) if self.on else x


class SimModel(nn.Module):
    """The QDQ graph as a module called like the user's model (what a user metric receives)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args, **kwargs):
        return self.gm(*args, **kwargs)


class Simulation:
    """The QDQ graph of a calibrated ObservedModel, with one switch per candidate layer.

    ``set(quantized=names)`` puts exactly the listed layers in int8 (their weights fake-quantized and the QDQ
    points they need on); ``set(floated=names)`` puts everything in int8 except the listed layers.
    """

    def __init__(self, observed):
        from ..convert import to_qdq

        gm = to_qdq(observed)
        self.model = SimModel(gm)
        self.model.eval()
        nodes = {n.name: n for n in gm.graph.nodes}
        points: dict[str, _SwitchQDQ] = {}  # QDQ node name -> switch
        for n in gm.graph.nodes:
            if "qcast_observes" in n.meta:
                sw = _SwitchQDQ(gm.get_submodule(n.target))
                setattr(gm, n.target, sw)
                points[n.name] = sw
        self.points = points
        self.candidates: list[tuple[str, str]] = []  # (name, op) in execution order
        self.owners: dict[str, set[str]] = {p: set() for p in points}
        self.weights: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        float_mods = dict(observed.gm.named_modules())
        for n in gm.graph.nodes:
            plan = n.meta.get("qcast_plan")
            if plan is None or plan.precision != "int8" or plan.kind != "compute":
                continue
            name = plan.name
            if name in self.weights:  # a second node with the same name: not a separate candidate
                continue
            self.candidates.append((name, plan.op))
            for inp in plan.kernel.impl.quant_inputs(n):
                p = _point_of(inp)
                if p is not None:
                    self.owners[p.name].add(name)
            # a QDQ point belongs to the int8 ops that read it, not to the op that writes it: a value is requantized
            # only for an int8 reader (plan.place_outputs), so with its readers in float the real model writes it fp32
            swaps = []
            if n.op == "call_module":
                qmod = gm.get_submodule(n.target)
                fmod = float_mods.get(n.target)
                if fmod is not None:
                    fstate = dict(fmod.named_parameters()) | dict(fmod.named_buffers())
                    for key, t in list(qmod.named_parameters()) + list(qmod.named_buffers()):
                        f = fstate.get(key)
                        if f is not None and f.shape == t.shape and not torch.equal(f, t):
                            swaps.append((t, t.data.clone(), f.data.clone()))
            self.weights[name] = swaps
        del nodes

    def set(self, *, quantized: set[str] | None = None, floated: set[str] | None = None) -> None:
        if (quantized is None) == (floated is None):
            raise ValueError("pass exactly one of quantized= or floated=")
        if quantized is not None:
            q = set(quantized)
            for p, sw in self.points.items():
                sw.on = bool(self.owners[p] & q)
        else:
            q = {name for name, _ in self.candidates} - set(floated)
            for p, sw in self.points.items():
                own = self.owners[p]
                sw.on = not own or bool(own & q)
        for name, swaps in self.weights.items():
            for t, qv, fv in swaps:
                t.data = qv if name in q else fv


def _point_of(node) -> fx.Node | None:
    """The QDQ node a quantized input comes from, walking back over int8 passthrough ops."""
    while isinstance(node, fx.Node) and "qcast_observes" not in node.meta:
        plan = node.meta.get("qcast_plan")
        if plan is None or plan.precision != "int8" or plan.kind != "passthrough":
            return None
        ins = plan.kernel.impl.quant_inputs(node)
        node = ins[0] if ins else None
    return node if isinstance(node, fx.Node) else None


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def sqnr_metric(calls: list[tuple[tuple, dict]], refs: list[Any]) -> Callable[[nn.Module], float]:
    """``fn(model) -> float``: the output SQNR (dB, min over output tensors) of ``model`` against the float
    outputs ``refs`` on ``calls``."""
    def metric(model: nn.Module) -> float:
        acc: list[list[float]] = []
        with torch.no_grad():
            for (args, kwargs), ref in zip(calls, refs):
                for i, (a, b) in enumerate(zip(_leaves(ref), _leaves(model(*args, **kwargs)))):
                    if len(acc) <= i:
                        acc.append([0.0, 0.0])
                    a = a.double()
                    acc[i][0] += a.pow(2).sum().item()
                    acc[i][1] += (a - _float(b).double()).pow(2).sum().item()
        return min(_db(s, n) for s, n in acc) if acc else math.nan
    metric.__name__ = SQNR_METRIC
    return metric


def call_metric(fn: Callable, model: nn.Module, argname: str, what: str) -> float:
    """``fn(model)`` as a float; anything else (an exception, a non-number, NaN) is an EvalError that says so."""
    try:
        with torch.no_grad():
            value = fn(model)
    except QcastError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's function: wrap with what we were doing
        raise EvalError(f"{argname} raised {type(e).__name__}: {e} (while evaluating {what}). {argname} must take a "
                        "model, called like the float model, and return a number (higher is better).") from e
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvalError(f"{argname} returned {type(value).__name__} ({value!r:.60}) for {what}; it must return one "
                        "number (higher is better), e.g. accuracy as a float")
    value = float(value)
    if math.isnan(value):
        raise EvalError(f"{argname} returned NaN for {what}; it must return a number (higher is better)")
    return value


def float_outputs(model: nn.Module, calls) -> list[Any]:
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        return [work(*a, **k) for a, k in calls]


# ------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------
def analyze(observed, metric: Callable, *, mode: str = "float_one", progress: bool = True, batches: int = 0,
            metric_name: str | None = None, argname: str = "metric") -> SensitivityReport:
    """Sensitivity of every candidate layer of a calibrated ObservedModel under ``metric(model) -> float``.

    Under an initialised ``torch.distributed`` group the evaluations (the two baselines, then one per candidate, in
    execution order) are split across the ranks and gathered (``qcast.distributed.search.split``): every rank
    returns the report one process would, and only rank 0 shows the (global) progress bar."""
    from ..distributed.search import digest, split

    sim = Simulation(observed)
    names = [n for n, _ in sim.candidates]
    tasks: list[tuple[str, str | None]] = [("quantized", None), ("float", None)] + [("layer", n) for n in names]

    def run(i: int) -> float:
        kind, name = tasks[i]
        if kind == "quantized":
            sim.set(floated=set())
            return call_metric(metric, sim.model, argname, "the fully quantized simulation")
        if kind == "float":
            sim.set(quantized=set())
            return call_metric(metric, sim.model, argname, "the float model (all QDQ points off)")
        if mode == "float_one":
            sim.set(floated={name})
        else:
            sim.set(quantized={name})
        return call_metric(metric, sim.model, argname, f"{mode} of layer {name!r}")

    bar = _bar(len(names), progress, mode)
    try:
        values = split(len(tasks), run, what=f"sensitivity ({mode}, {len(names)} layers)", counts=lambda i: i >= 2,
                       bar=bar, signature=digest(names))
    finally:
        if bar is not None:
            bar.close()
    quantized, floated = values[0], values[1]
    baseline = quantized if mode == "float_one" else floated
    rows = []
    for (name, op), value in zip(sim.candidates, values[2:]):
        if mode == "float_one":
            delta = value - baseline
        else:
            delta = -value if math.isinf(baseline) else baseline - value
        rows.append(SensitivityRow(name, op, value, delta))
    # stable: equal deltas keep execution order, the same on every rank
    rows.sort(key=lambda r: -r.delta if not math.isnan(r.delta) else math.inf)
    return SensitivityReport(mode, metric_name or getattr(metric, "__name__", "metric"), baseline, quantized,
                             floated, tuple(rows), batches)


def _bar(total: int, enabled: bool, mode: str):
    from ..distributed.search import world

    w = world()
    if not enabled or (w is not None and w.rank != 0):  # one bar for the whole job, on rank 0
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"qcast sensitivity ({mode})", unit="layer", leave=False, file=sys.stderr)


def _rank() -> int:
    from ..distributed.search import world

    w = world()
    return 0 if w is None else w.rank


# ------------------------------------------------------------------------------------------------
# cache key
# ------------------------------------------------------------------------------------------------
def _hash_tensors(h, items) -> None:
    for key, t in items:
        t = t.detach()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    _hash_tensors(h, model.state_dict(keep_vars=False).items())
    return h.hexdigest()


def data_fingerprint(calls) -> str:
    h = hashlib.blake2b(digest_size=16)
    for i, (args, kwargs) in enumerate(calls):
        h.update(f"call{i}:{len(args)}:{sorted(kwargs)}".encode())
        _hash_tensors(h, list(tensors_in((args, kwargs))))
        h.update(repr([a for a in args if not isinstance(a, torch.Tensor)]).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------------
def sensitivity(model: nn.Module, data: Any, *, metric: Callable[[nn.Module], float] | None = None,
                config: QuantConfig | dict | None = None, mode: str = "float_one", progress: bool = True,
                num_batches: int | None = None, input_fn: Callable | None = None, cache: bool = True) -> SensitivityReport:
    """How much each int8 layer of ``model`` matters, most sensitive first (see the module docstring).

    ``data`` calibrates the model (items as in ``qcast.quantize``) and, when ``metric`` is None, is also where the
    default metric is measured: the output SQNR (dB) of the simulation against the float model. ``metric`` is
    ``fn(model) -> float``, higher is better, called with a module that runs like the float model.

    The analysis runs on the QDQ simulation (one calibration, switches per layer), not on a re-quantized int8
    model per layer. Measured against the real int8 model quantized with ``QuantConfig(skip=[layer])`` (output
    SQNR, 8 batches): ResNet-18 float_one, the simulation reads ~0.45 dB high, every row within 1.0 dB, rank
    correlation 0.54 on a flat landscape (all layers within 0.6 dB); MobileNetV2 float_one top 3 deltas
    +2.06/+1.49/+0.28 dB simulated vs +2.06/+1.43/+0.80 dB real; ResNet-18 quantize_one rank correlation 0.60,
    mean |difference| 1.2 dB. A deliberately sensitive layer (tests/report/test_sensitivity.py) is ranked first by
    both, within 1.5 dB. Fused residual adds and ops that need an int8 input are where the two differ
    (docs/design.md, "Sensitivity and the accuracy-aware mode").

    Cached per process: the same weights, data, config, mode, metric, num_batches and input_fn return the cached
    report without running anything (``cache=False`` recomputes; ``qcast.report.clear_sensitivity_cache()`` empties it).

    Under an initialised ``torch.distributed`` process group (torchrun, Slurm), call it on every rank with the same
    arguments: the per-layer evaluations are split across the ranks (``qcast.distributed.search``) and every rank
    returns the report one process would (same rows, same numbers); rank 0 shows the progress of the whole job.
    Each rank calibrates on its own ``data``, which must be the same on every rank here (docs/scale.md).
    """
    from ..api import _replay
    from ..calibrate import calibrate
    from ..prepare import as_config, check_model, prepare

    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not one of {list(MODES)}: 'float_one' keeps one layer float at a time, "
                          "'quantize_one' quantizes one layer at a time")
    if metric is not None and not callable(metric):
        raise ConfigError(f"metric must be a function fn(model) -> float (higher is better), got {type(metric).__name__}")
    config = as_config(config)
    check_model(model)
    calls = list(iter_calls(data, input_fn, num_batches))
    if not calls:
        raise CalibrationError("data yielded no batches: pass at least one input (e.g. 8-32 representative batches)")
    key = None
    if cache:
        key = (model_fingerprint(model), data_fingerprint(calls), config.to_json(), mode, metric, num_batches, input_fn)
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    args, kwargs = calls[0]
    observed = prepare(model, kwargs if kwargs and not args else (args[0] if len(args) == 1 and not kwargs else args),
                       config)
    calibrate(observed, list(_replay(calls[0], iter(calls[1:]))), progress=progress and _rank() == 0)
    if metric is None:
        fn = sqnr_metric(calls, float_outputs(model, calls))
        report = analyze(observed, fn, mode=mode, progress=progress, batches=len(calls), metric_name=SQNR_METRIC)
    else:
        report = analyze(observed, metric, mode=mode, progress=progress, batches=len(calls))
    if key is not None:
        _CACHE[key] = report
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return report
