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
              progress: bool = True, total: int | None = None, *, resume=None, checkpoint=None,
              checkpoint_every: int | None = None) -> CalibrationSummary:
    """Run ``calibration_data`` through ``observed`` (from ``prepare``); returns and stores a summary.

    Under an initialised ``torch.distributed`` process group (torchrun, Slurm) this is a collective: each rank passes
    its own shard, the statistics are reduced across ranks and every rank ends with what one process calibrated on
    the union would hold (``qcast.distributed``, docs/scale.md). Rank 0 shows the progress of the whole job.

    ``resume``: a path (or ``CalibrationState``) saved by an earlier ``checkpoint=``: loaded into this freshly
    prepared model before ``calibration_data`` (the batches not yet seen) is run. ``checkpoint``: a path the state is
    written to when calibration ends (by rank 0 under a process group), and in a single process also every
    ``checkpoint_every`` batches (``qcast.calibration_state``)."""
    from .distributed import group
    from .distributed.calibration import forget_carried, progress_total, reduce_observed
    from .prepare import ObservedModel

    if not isinstance(observed, ObservedModel):
        raise CalibrationError(f"calibrate() needs the model returned by qcast.prepare(), got {type(observed).__name__}")
    group.ensure_group()  # under torchrun without a process group: initialise one (gloo)
    if checkpoint_every is not None:
        if checkpoint is None or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise CalibrationError(f"checkpoint_every={checkpoint_every!r} needs checkpoint=PATH and a positive int")
        if group.active():
            raise CalibrationError("checkpoint_every= is for a single process: under a process group the ranks' "
                                   "statistics are reduced once, when calibrate() ends; split the data into several "
                                   "calibrate(..., checkpoint=PATH) calls instead (docs/scale.md)")
    if resume is not None:
        from .calibration_state import CalibrationState, restore_state
        with group.collective("resuming the calibration state"):  # a rank that cannot read it fails every rank
            restore_state(observed, resume if isinstance(resume, CalibrationState) else CalibrationState.load(resume))
    carried = forget_carried(observed)  # under a process group only rank 0 keeps an earlier (reduced) state
    total = total or num_batches
    if total is None and hasattr(calibration_data, "__len__") and not isinstance(calibration_data, (torch.Tensor, dict)):
        total = len(calibration_data)
    total = progress_total(total)  # the whole job's (collective)
    show = progress and group.is_main()
    from .smooth import migrate, unresolved
    if unresolved(observed):  # QuantConfig(smoothquant=...): a first pass over the data picks the scales
        calls = list(iter_calls(calibration_data, input_fn, num_batches))  # materialized: the data is run twice
        migrate(observed, calls, lambda i, a, k: _call(observed, i, a, k), show)
        calibration_data, input_fn, num_batches = [k or a for a, k in calls], None, None
    bar = _progress(total, show)
    step = group.world_size()  # rank 0's bar advances for every rank (shards of even size), corrected at the end
    if bar is not None and step > 1:
        bar.set_description(f"qcast calibrate ({step} ranks)")
    seen = 0
    hooks = _collect_input_means(observed) if observed.qcast_config.bias_correction else []
    from .adaround import collect_inputs
    hooks += collect_inputs(observed)  # rounding="adaround": each layer's input rows (none otherwise)
    observed.qcast_progress = show  # convert() runs AdaRound with the same progress setting
    example = None
    try:
        with group.collective("calibration"), torch.no_grad():
            for i, (args, kwargs) in enumerate(iter_calls(calibration_data, input_fn, num_batches)):
                _call(observed, i, args, kwargs)
                if i == 0:  # backend="auto" checks and times the backends on a real input (convert)
                    example = (args, kwargs)
                seen += 1
                if bar is not None:
                    bar.update(min(step, bar.total - bar.n) if bar.total else step)
                if checkpoint_every and seen % checkpoint_every == 0:
                    _write_checkpoint(observed, checkpoint, seen)
    finally:
        for h in hooks:
            h.remove()
    try:
        counts = group.all_gather_object(seen)
        total_seen = sum(counts)
        if total_seen == 0:
            raise CalibrationError("calibration_data yielded no batches" + (" on any rank" if len(counts) > 1 else "")
                                   + ": pass at least one input (e.g. 8-32 representative batches); a consumed "
                                   "generator yields nothing the second time")
        src = next(r for r, c in enumerate(counts) if c)
        example = group.broadcast_object(example, src)  # every rank checks and times backends on the same input
        if example is not None:
            observed.qcast_example = example
        reduce_observed(observed, carried)
        if bar is not None:  # the whole job's count, now known
            bar.n = total_seen
            bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    rows = []
    for _, obs in observed.observers():
        if obs.calibrated and obs.estimator != "fixed":
            lo, hi = obs.clip_range()
            rows.append(RangeRow(obs.name, obs.estimator, obs.min_val, obs.max_val, lo, hi))
    prev = observed.qcast_summary.batches if observed.qcast_summary else 0
    summary = CalibrationSummary(batches=prev + total_seen, ranges=tuple(rows))
    observed.qcast_summary = summary
    if checkpoint is not None and group.is_main():
        observed.calibration_state().save(checkpoint)
    return summary


def _write_checkpoint(observed, path, seen: int) -> None:
    """The state after ``seen`` more batches (single process), written atomically."""
    from .calibration_state import capture_state
    prev = observed.qcast_summary.batches if observed.qcast_summary else 0
    state = capture_state(observed)
    type(state)(prev + seen, state.fingerprint, state.entries).save(path)
