"""calibrate: run data through the observed model, with a progress bar and a summary of what was seen."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .data import check_finite, describe, iter_calls
from .errors import CalibrationError, InputError, QcastError


@dataclass(frozen=True)
class RangeRow:
    name: str
    estimator: str
    min: float
    max: float
    clip_min: float
    clip_max: float


@dataclass(frozen=True)
class CalibrationSummary:
    """What calibration saw: batches, and per observed tensor its range and the clipping range chosen."""

    batches: int
    ranges: tuple[RangeRow, ...]

    def __repr__(self) -> str:
        return f"CalibrationSummary(batches={self.batches}, tensors={len(self.ranges)})"

    def table(self, limit: int | None = None) -> str:
        rows = self.ranges[:limit] if limit else self.ranges
        w = max([len(r.name) for r in rows] + [6])
        lines = [f"{'tensor':<{w}}  {'estimator':<10} {'seen min':>10} {'seen max':>10} {'clip min':>10} {'clip max':>10}"]
        for r in rows:
            lines.append(f"{r.name:<{w}}  {r.estimator:<10} {r.min:>10.4g} {r.max:>10.4g} {r.clip_min:>10.4g} {r.clip_max:>10.4g}")
        return "\n".join(lines)


def _progress(total: int | None, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; stay usable without it
        return None
    return tqdm(total=total, desc="qcast calibrate", unit="batch", leave=False, file=sys.stderr)


def _collect_input_means(observed) -> list:
    """Forward pre-hooks (removed after calibration) that record each int8 conv/linear's per-channel input mean,
    for ``QuantConfig(bias_correction=True)``. A hook per layer, not an observer: the observer of a value may sit
    before a max-pool or a flatten that changes what the layer actually sees. A module called at several sites
    pools its sites (they share one bias)."""
    import torch.nn as nn

    from .convert import int8_layers
    from .observers import ChannelMean

    hooks = []
    for target, layer in int8_layers(observed.gm).items():
        stats = observed.qcast_input_stats.setdefault(target, ChannelMean(-1 if isinstance(layer, nn.Linear) else 1))
        hooks.append(observed.gm.get_submodule(target).register_forward_pre_hook(
            lambda _m, args, st=stats: st.update(args[0])))
    return hooks


def _call(observed, i: int, args: tuple, kwargs: dict) -> None:
    """Run calibration batch ``i``; errors name the batch."""
    where = f"calibration batch {i}"
    check_finite(args, kwargs, where)
    try:
        observed(*args, **kwargs)
    except QcastError as e:
        raise type(e)(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise InputError(
            f"{where} {describe(args, kwargs)} does not fit the model: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Calibration items are called as "
            "model(t), model(*tuple) or model(**dict); use input_fn= to pick the inputs out of a batch.") from e


def calibrate(observed, calibration_data: Any, input_fn: Callable | None = None, num_batches: int | None = None,
              progress: bool = True, total: int | None = None) -> CalibrationSummary:
    """Run ``calibration_data`` through ``observed`` (from ``prepare``); returns and stores a summary."""
    from .prepare import ObservedModel

    if not isinstance(observed, ObservedModel):
        raise CalibrationError(f"calibrate() needs the model returned by qcast.prepare(), got {type(observed).__name__}")
    total = total or num_batches
    if total is None and hasattr(calibration_data, "__len__") and not isinstance(calibration_data, (torch.Tensor, dict)):
        total = len(calibration_data)
    from .smooth import migrate, unresolved
    if unresolved(observed):  # QuantConfig(smoothquant=...): a first pass over the data picks the scales
        calls = list(iter_calls(calibration_data, input_fn, num_batches))  # materialized: the data is run twice
        migrate(observed, calls, lambda i, a, k: _call(observed, i, a, k), progress)
        calibration_data, input_fn, num_batches = [k or a for a, k in calls], None, None
        total = total or len(calls)
    bar = _progress(total, progress)
    seen = 0
    hooks = _collect_input_means(observed) if observed.qcast_config.bias_correction else []
    from .adaround import collect_inputs
    hooks += collect_inputs(observed)  # rounding="adaround": each layer's input rows (none otherwise)
    observed.qcast_progress = progress  # convert() runs AdaRound with the same progress setting
    try:
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(iter_calls(calibration_data, input_fn, num_batches)):
                _call(observed, i, args, kwargs)
                if i == 0:  # backend="auto" checks and times the backends on a real input (convert)
                    observed.qcast_example = (args, kwargs)
                seen += 1
                if bar is not None:
                    bar.update(1)
    finally:
        for h in hooks:
            h.remove()
        if bar is not None:
            bar.close()
    if seen == 0:
        raise CalibrationError("calibration_data yielded no batches: pass at least one input (e.g. 8-32 "
                               "representative batches); a consumed generator yields nothing the second time")
    rows = []
    for _, obs in observed.observers():
        if obs.calibrated and obs.estimator != "fixed":
            lo, hi = obs.clip_range()
            rows.append(RangeRow(obs.name, obs.estimator, obs.min_val, obs.max_val, lo, hi))
    prev = observed.qcast_summary.batches if observed.qcast_summary else 0
    summary = CalibrationSummary(batches=prev + seen, ranges=tuple(rows))
    observed.qcast_summary = summary
    return summary
