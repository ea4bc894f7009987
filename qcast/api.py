"""quantize(): the whole pipeline, readable top to bottom: prepare -> calibrate -> convert."""
from __future__ import annotations

import copy
import itertools
from typing import Any, Callable

import torch
import torch.nn as nn

from .calibrate import calibrate
from .config import QuantConfig
from .convert import convert
from .data import check_finite, describe, iter_calls
from .errors import CalibrationError
from .prepare import as_config, prepare
from .quantized import QuantizedModel


def quantize(model: nn.Module, calibration_data: Any, *, config: QuantConfig | dict | None = None,
             input_fn: Callable | None = None, num_batches: int | None = None, eval_fn: Callable | None = None,
             max_drop: float | None = None, backend: str | None = None, progress: bool = True,
             check_speed: bool = True) -> QuantizedModel:
    """Return an int8 copy of ``model`` calibrated on ``calibration_data``; ``model`` itself is untouched.

    Calibration items: Tensor -> ``model(t)``; tuple/list -> ``model(*item)``; dict -> ``model(**item)``.
    A single Tensor is one batch. ``input_fn`` maps each item (e.g. an ``(x, label)`` pair) to such an
    input; ``num_batches`` caps how many are used.

    Accuracy-aware mode: with ``eval_fn(model) -> float`` (higher is better) and ``max_drop`` (absolute, in the
    metric's units), layers are kept in float, fewest first, guided by sensitivity, until
    ``eval_fn(qmodel) >= eval_fn(model) - max_drop``; every step is in ``qmodel.qcast_meta["accuracy_search"]``
    (see ``qcast.accuracy``). If even all candidates in float miss the target, a warning and the best model found.

    ``backend``: who runs the int8 graph (default: ``config.backend``): ``"torch"`` (PyTorch's int8 kernels),
    ``"openvino"``, or ``"auto"``: each installed backend checked against the QDQ simulation and timed on the first
    calibration batch, the fastest kept (``qmodel.qcast_meta["backend_choice"]``). With the default
    ``activation="auto"``, a model whose plan has per-token linears also gets a static-linear plan
    (``activation="int8"``) built and kept where it is faithful to float and faster, and, where the static plan is
    not faithful, a mixed plan keeping its most sensitive linears per-token (``qcast.backends.plans``).

    ``check_speed``: time the float and the int8 model on the first calibration batch (interleaved, bounded to about
    half a second, ``qcast.report.speed``); a ``SlowerThanFloatWarning`` with the figures and what to try when int8
    is slower. The figures are in ``qmodel.qcast_meta["speed"]``.
    """
    if eval_fn is not None or max_drop is not None:
        from .accuracy import check_accuracy_args
        check_accuracy_args(eval_fn, max_drop)
    config = as_config(config)
    if backend is not None and backend != config.backend:
        config = config.replace(backend=backend)
    backend = config.backend
    from .distributed import group
    group.ensure_group()  # under torchrun without a process group: initialise one (gloo)
    calls = iter_calls(calibration_data, input_fn, num_batches)
    with group.collective("reading the first calibration batch"):  # a rank whose data is unusable fails every rank
        first = next(calls, None)
    # under torch.distributed each rank passes its own shard (possibly empty): every rank prepares on the same input,
    # the first batch of the lowest rank that has one
    has = group.all_gather_object(first is not None)
    if not any(has):
        raise CalibrationError("calibration_data yielded no batches" + (" on any rank" if len(has) > 1 else "")
                               + ": pass at least one input (e.g. 8-32 representative batches); a consumed "
                               "generator yields nothing the second time")
    example = group.broadcast_object(first, has.index(True))
    args, kwargs = example
    # the first batch doubles as prepare()'s example input: check it here so an error names it as the
    # calibration batch it is (prepare would call it "example_inputs", an argument the user never passed)
    check_finite(args, kwargs, "calibration batch 0")
    total = len(calibration_data) if hasattr(calibration_data, "__len__") and not isinstance(calibration_data, dict) else None
    if total is not None and not hasattr(calibration_data, "shape") and num_batches:
        total = min(total, num_batches)
    total = None if hasattr(calibration_data, "shape") else total
    if eval_fn is not None:
        from .accuracy import accuracy_aware
        # every search step re-calibrates on the same batches: keep them (a generator is consumed once)
        qmodel = accuracy_aware(model, [first, *calls], config, backend, eval_fn, max_drop, progress)
    else:
        from .backends import plans
        if plans.skip_reason(config, backend):  # static variant not wanted or not possible: the plan as configured
            qmodel, _ = quantize_calls(model, first, calls, config, backend, progress, total, example, True)
        elif group.active():  # the static variant holds back a batch, which ranks do not share: per-token, and said
            qmodel, _ = quantize_calls(model, first, calls, config, backend, progress, total, example, True)
            qmodel.qcast_meta.setdefault("backend_choice", {})["plans"] = {
                "kept": "per-token", "skipped": "distributed calibration: the static-linear plan's held-back batch is "
                                                "not defined across ranks (docs/scale.md)"}
        else:  # backend="auto", default activations: also try the static-linear plan (qcast.backends.plans)
            if _reiterable(calibration_data):  # a second pass over the data: memory stays bounded
                qmodel, _ = quantize_calls(model, first, calls, config, backend, progress, total, None, True)
                source = lambda: iter_calls(calibration_data, input_fn, num_batches)  # noqa: E731
            else:  # a one-shot iterator (generator): the batches are kept to be run twice (docs/design.md)
                held = [first, *calls]
                qmodel, _ = quantize_calls(model, held[0], iter(held[1:]), config, backend, progress, total, None, True)
                source = held
            # the static plan's observed model is kept (not converted in place): the mixed plan ranks its linears on it
            qmodel = plans.choose_plan(model, source, qmodel, lambda cs, per_token=(): quantize_calls(
                model, next(cs), cs, plans.static_config(config, per_token), backend, False))
    if check_speed:
        from .report.speed import speed_check, warn_if_slower
        # the user's model is only ever run in eval mode (a training-mode BatchNorm would update its statistics)
        float_model = copy.deepcopy(model).eval() if model.training else model
        # timed on rank 0 only under a process group: every rank gets the same figures
        speed = group.decide_on_main(speed_check, float_model, qmodel, args, kwargs, describe(args, kwargs))
        qmodel.qcast_meta["speed"] = speed.to_dict()
        if group.is_main():
            warn_if_slower(speed)
    return qmodel


def quantize_calls(model, first, rest, config: QuantConfig, backend: str, progress: bool, total: int | None = None,
                   example=None, discard_observed: bool = False):
    """prepare on ``example`` (default ``first``), calibrate on ``first`` (None: an empty shard) + ``rest``, convert:
    (qmodel, the calibrated ObservedModel). ``discard_observed``: the caller will not use the observed model, so
    convert turns its graph into the QDQ graph in place (one float copy of the model less at the peak; the observed
    model returned is then spent)."""
    args, kwargs = example or first
    observed = prepare(model, kwargs if kwargs and not args else (args[0] if len(args) == 1 and not kwargs else args), config)
    summary = calibrate(observed, _replay(first, rest), progress=progress, total=total)
    observed.qcast_convert_in_place = discard_observed
    qmodel = convert(observed, backend=backend)
    qmodel.qcast_meta["example_input"] = describe(args, kwargs)
    qmodel.qcast_meta["calibration_summary"] = summary
    return qmodel, observed


def _reiterable(data) -> bool:
    """Data that can be read twice: iterating it gives a fresh iterator (a list, a Dataset, a DataLoader), unlike a
    generator or an iterator (``iter(it) is it``)."""
    if isinstance(data, (torch.Tensor, dict)) or not hasattr(data, "__iter__"):
        return False
    try:
        return iter(data) is not data
    except TypeError:
        return False


def _replay(first, rest):
    """Calls as items again (tuple of args, or dict of kwargs), first one included."""
    for args, kwargs in itertools.chain([first] if first is not None else [], rest):
        if kwargs and args:
            raise CalibrationError("a calibration item mixing positional and keyword inputs is not supported: "
                                   "use input_fn to return either a tuple or a dict")
        yield kwargs if kwargs else args
