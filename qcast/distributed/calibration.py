"""Calibration across ranks: every rank calibrates on its own shard, then the statistics are reduced so that every
rank holds what one process calibrated on the union would (docs/scale.md, "Calibration").

What is exchanged, per observed tensor (a few collectives for the whole model, not one per observer):

* min / max / batch count: one all-reduce (min of ``[lo, -hi]``) and one sum, 8 bytes each per observer;
* histograms (``mse``, ``kl``, ``percentile``): every rank moves its counts to the grid of the union's range
  (``HistogramObserver.grid``, exact) and the counts are summed: ``bins`` float64 per observer (32 KiB; 64 KiB for kl);
* ``ema``: each rank's ``(ema, batches, first range)``, combined in rank order (``EMAObserver.combine``);
* bias correction's per-channel input sums (``ChannelMean``): one float64 per input channel per int8 conv/linear;
* AdaRound's sampled rows (``InputRows``): every rank's sample (at most ``cap`` rows per layer), the union's
  smallest keys kept;
* SmoothQuant's per-channel max |x| (``Smooth.absmax``): one max-reduction, one float per channel
  (``group.all_reduce_optional``, called by ``qcast.smooth.migrate``).

This module sits in the pipeline layer (it reads the observed model's AdaRound samples), the helpers it uses in
``group.py`` in the core.
"""
from __future__ import annotations

import torch

from . import group


def reduce_observed(observed, carried: bool) -> None:
    """Collective: reduce every statistic of ``observed`` across ranks, in place, identically on every rank.
    ``carried``: whether these statistics include a previous calibration's (or a resumed checkpoint's) already
    reduced state, which only rank 0 keeps (``forget_carried``) so that it is counted once."""
    if not group.active():
        return
    from ..observers import EMAObserver, HistogramObserver

    named = [(name, o) for name, o in observed.observers() if o.estimator != "fixed"]
    # the reductions below pair observers by position: ranks with another model or config (other observers) would
    # mix statistics or abort gloo on a size mismatch, so the layouts are compared first (one small object per rank)
    import hashlib
    layout = hashlib.sha256(repr([(name, type(o).__name__, o.estimator, getattr(o, "bins", None))
                                  for name, o in named]).encode()).hexdigest()
    layouts = group.all_gather_object(layout)
    odd = [r for r, h in enumerate(layouts) if h != layouts[0]]
    if odd:
        from ..errors import DistributedError
        raise DistributedError(f"calibration: rank(s) {odd} of {len(layouts)} observe other tensors than rank 0 (another "
                               "model, config or skip list): every rank must call qcast with the same model and config "
                               "and only its own shard of the data")
    observers = [o for _, o in named]
    local_batches = [o.batches for o in observers]
    n = len(observers)
    # min / max / batches
    mm = torch.tensor([v for o in observers for v in (o.min_val, -o.max_val)], dtype=torch.float64)
    counts = torch.tensor([o.batches for o in observers], dtype=torch.float64)
    if n:
        group.all_reduce(mm, "min")
        group.all_reduce(counts, "sum")
    hists = [o for o in observers if isinstance(o, HistogramObserver)]
    for i, o in enumerate(observers):
        o.min_val, o.max_val, o.batches = float(mm[2 * i]), -float(mm[2 * i + 1]), int(counts[i])
    # histograms: each rank's counts on the grid of the union's range, then summed
    seen = [o for o in hists if o.batches]
    for o in seen:
        o.regrid(*o.grid(o.min_val, o.max_val))
        if o.k is None:  # this rank saw none of it: an empty histogram on the common grid
            o.k, o.start = o.grid(o.min_val, o.max_val)
    if seen:
        flat = torch.cat([o.hist for o in seen])
        group.all_reduce(flat, "sum")
        for o, h in zip(seen, flat.split([o.bins for o in seen])):
            o.hist = h.clone()
    # ema: combined in rank order
    emas = [o for o in observers if isinstance(o, EMAObserver)]
    if emas:
        local = dict(zip(map(id, observers), local_batches))
        mine = [(o.ema, local[id(o)], o.first) for o in emas]
        everyone = group.all_gather_object(mine)
        for j, o in enumerate(emas):
            o.ema, _, o.first = EMAObserver.combine([parts[j] for parts in everyone])
    for o in observers:
        o.__dict__.pop("_clip_cache", None)
    _reduce_channel_means(observed)
    _reduce_rows(observed)


def _reduce_channel_means(observed) -> None:
    stats = observed.qcast_input_stats
    if not stats:
        return
    targets = sorted(stats)
    info = group.all_gather_object([(stats[t].count, stats[t].spatial,
                                     None if stats[t].sum is None else stats[t].sum.numel()) for t in targets])
    sizes = {}
    for j, t in enumerate(targets):
        widths = {row[j][2] for row in info if row[j][2] is not None}
        if len(widths) > 1:
            raise group.DistributedError(f"{t}: ranks saw {sorted(widths)} input channels")
        sizes[t] = widths.pop() if widths else None
    live = [t for t in targets if sizes[t] is not None]
    if live:
        flat = torch.cat([stats[t].sum if stats[t].sum is not None else torch.zeros(sizes[t], dtype=torch.float64)
                          for t in live])
        group.all_reduce(flat, "sum")
        for t, s in zip(live, flat.split([sizes[t] for t in live])):
            stats[t].sum = s.clone()
    for j, t in enumerate(targets):
        stats[t].count = sum(row[j][0] for row in info)
        stats[t].spatial = next((row[j][1] for row in info if row[j][1] is not None), None)


def _reduce_rows(observed) -> None:
    store = observed.__dict__.get("qcast_layer_inputs", {})
    if not store:
        return
    targets = sorted(store)
    everyone = group.all_gather_object([(store[t].keys, store[t].rows, store[t].count) for t in targets])
    for j, t in enumerate(targets):
        store[t].merge([parts[j] for parts in everyone])


def forget_carried(observed) -> bool:
    """Before a calibration pass under a process group: ranks other than 0 drop the already reduced statistics
    they carry (every rank holds them after a reduction or a resumed checkpoint), so the next reduction counts them
    once, through rank 0. Returns whether there was anything carried."""
    carried = bool(observed.qcast_summary and observed.qcast_summary.batches)
    if not group.active() or not carried or group.is_main():
        return carried
    for _, o in observed.observers():
        if o.estimator != "fixed":
            o.reset()
    for st in observed.qcast_input_stats.values():
        st.reset()
    for rows in observed.__dict__.get("qcast_layer_inputs", {}).values():
        rows.reset()
    return carried


def progress_total(local_total: int | None) -> int | None:
    """The whole job's batch count for rank 0's progress bar (None when any rank's shard has no length)."""
    if not group.active():
        return local_total
    totals = group.all_gather_object(local_total)
    return None if any(t is None for t in totals) else sum(totals)
