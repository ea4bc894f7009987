"""Accuracy-aware quantization: keep the fewest layers in float so that ``eval_fn(qmodel) >= eval_fn(model) - max_drop``.

``qcast.quantize(model, data, eval_fn=fn, max_drop=0.01)`` runs:

1. the float metric ``fn(model)`` (on a private eval-mode copy) and the target ``fn(model) - max_drop``;
2. the fully int8 model; if it meets the target it is returned as is;
3. a sensitivity ranking of the int8 compute layers (``mode="float_one"``, on the QDQ simulation, one calibration).
   The metric is ``eval_fn`` itself when ranking with it is affordable: (candidates + 2) calls, estimated from the
   time of the ``eval_fn`` call on the int8 model, within ``RANK_BUDGET_S`` seconds. Otherwise the output SQNR on the
   calibration batches ranks the layers (no ``eval_fn`` calls) and the report says so (``ranked_by``);
4. greedy by sensitivity: the ``k`` most sensitive layers in float (``QuantConfig.skip`` on their exact names,
   re-quantized on the same calibration batches), all candidates first (is the target reachable at all?), then a
   binary search for the smallest ``k`` that meets the target (it assumes that keeping more layers in float does not
   hurt, which holds up to calibration noise), then a pruning pass that tries to put each kept layer back in
   int8, least sensitive first (``PRUNE_MAX`` tries at most);
5. the model with the fewest float layers that meets the target (ties: the better metric). Every evaluation is a
   ``SearchStep`` of the ``AccuracySearch`` stored in ``qmodel.qcast_meta["accuracy_search"]``, logged on the
   ``qcast`` logger and, with ``progress=True``, printed as a table. If no step meets the target, a ``UserWarning``
   says so and the best model found (highest metric, then fewest float layers) is returned.

Under an initialised ``torch.distributed`` process group every rank calls ``quantize`` with the same arguments: the
evaluations are split across the ranks (``qcast.distributed.search``; the greedy steps are evaluated ``world size``
at a time, the next step plus the steps each of its outcomes would lead to) and every rank returns the model and the
``AccuracySearch`` one process would (docs/scale.md, "Sensitivity and accuracy search").
"""
from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from .config import QuantConfig
from .errors import ConfigError

log = logging.getLogger("qcast")

#: rank with eval_fn itself when (candidates + 2) eval_fn calls are estimated to take at most this many seconds
RANK_BUDGET_S = 120.0
#: at most this many single-layer removals are tried after the binary search
PRUNE_MAX = 16


@dataclass(frozen=True)
class SearchStep:
    """One evaluated model: the layers kept in float, ``eval_fn`` on it, and whether it meets the target."""

    float_layers: tuple[str, ...]
    metric: float
    meets: bool
    note: str

    def __repr__(self) -> str:
        return (f"SearchStep({len(self.float_layers)} float: {list(self.float_layers)}, metric={self.metric:.6g}, "
                f"{'meets' if self.meets else 'misses'} target, {self.note})")


@dataclass(frozen=True)
class AccuracySearch:
    """What the accuracy-aware mode did. ``float_layers``/``metric``: the returned model's."""

    float_metric: float
    max_drop: float
    target: float
    ranked_by: str
    ranking: tuple[str, ...]
    steps: tuple[SearchStep, ...]
    float_layers: tuple[str, ...]
    metric: float
    met: bool

    def __repr__(self) -> str:
        return (f"AccuracySearch({'met' if self.met else 'MISSED'}: metric {self.metric:.6g} vs target {self.target:.6g} "
                f"(float {self.float_metric:.6g} - max_drop {self.max_drop:g}), {len(self.float_layers)} layer(s) in "
                f"float: {list(self.float_layers)}, {len(self.steps)} steps)")

    def table(self) -> str:
        out = [f"accuracy-aware quantization: float metric {self.float_metric:.6g}, max_drop {self.max_drop:g} -> "
               f"target {self.target:.6g}; layers ranked by {self.ranked_by}",
               f"{'step':>4}  {'metric':>12}  {'target':<6} {'#float':>6}  what / layers in float"]
        for i, s in enumerate(self.steps):
            layers = ", ".join(s.float_layers) if len(s.float_layers) <= 6 else \
                ", ".join(s.float_layers[:6]) + f", ... ({len(s.float_layers) - 6} more)"
            out.append(f"{i:>4}  {s.metric:>12.6g}  {'met' if s.meets else 'missed':<6} {len(s.float_layers):>6}  "
                       f"{s.note}" + (f": {layers}" if layers else ""))
        out.append(("result: target met" if self.met else "result: TARGET NOT MET, best model found")
                   + f" with {len(self.float_layers)} layer(s) in float {list(self.float_layers)}, metric {self.metric:.6g}")
        return "\n".join(out)


def check_accuracy_args(eval_fn: Any, max_drop: Any) -> None:
    if eval_fn is None:
        raise ConfigError(f"max_drop={max_drop!r} needs eval_fn: pass eval_fn=fn with fn(model) -> float (higher is "
                          "better, e.g. accuracy on a validation set) to turn on the accuracy-aware mode, or drop max_drop")
    if max_drop is None:
        raise ConfigError("eval_fn needs max_drop: pass max_drop= the largest acceptable drop of eval_fn, in its units "
                          "(e.g. max_drop=0.01 for one point of accuracy in [0, 1]), or drop eval_fn")
    if not callable(eval_fn):
        raise ConfigError(f"eval_fn must be a function fn(model) -> float (higher is better), got {type(eval_fn).__name__}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) or max_drop < 0:
        raise ConfigError(f"max_drop must be a finite number >= 0 (absolute, in eval_fn's units), got {max_drop!r}")


def exact(name: str) -> str:
    """A QuantConfig.skip pattern matching exactly this name (glob characters escaped)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def search_plan(ranking: tuple[str, ...], prune_max: int = PRUNE_MAX):
    """Steps 4 of the module docstring as a generator: yields ``(float_layers, note, likely_meets)`` and is sent back
    whether that model meets the target. Pure logic (no evaluation), so it can be replayed on assumed outcomes:
    that is how a distributed run evaluates the next few steps of both branches ahead (``_speculate``)."""
    n = len(ranking)
    if not n:
        return
    if not (yield ranking, f"all {n} candidate layers in float", True):
        return
    lo, hi = 0, n  # lo misses (all int8), hi meets
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (yield ranking[:mid], f"binary search: {mid} most sensitive in float", True):
            hi = mid
        else:
            lo = mid
    kept = list(ranking[:hi])
    for name in list(reversed(kept))[:prune_max] if len(kept) > 1 else []:
        trial = tuple(k for k in kept if k != name)
        if (yield trial, f"prune: {name} back to int8", False):  # a minimal set: removals mostly miss
            kept = list(trial)


def _next_step(ranking: tuple[str, ...], outcomes: list[bool]):
    """The step the search asks for after these outcomes, or None when it is done."""
    gen = search_plan(ranking)
    try:
        req = next(gen)
        for meets in outcomes:
            req = gen.send(meets)
    except StopIteration:
        return None
    return req


def _speculate(ranking: tuple[str, ...], outcomes: list[bool], known: dict[frozenset, bool], size: int) -> list:
    """Up to ``size`` distinct steps not evaluated yet, breadth first over the outcomes still unknown (the likely
    branch first): the next step of the search, then the steps it asks for after each of its outcomes, ..."""
    batch: list = []
    keys: set[frozenset] = set()
    queue = [list(outcomes)]
    visits = 0
    while queue and len(batch) < size and visits < 64 * size:
        prefix = queue.pop(0)
        visits += 1
        req = _next_step(ranking, prefix)
        if req is None:
            continue
        key = frozenset(req[0])
        if key in known:
            queue.append(prefix + [known[key]])
            continue
        if key not in keys:
            keys.add(key)
            batch.append(req)
        queue.append(prefix + [req[2]])
        queue.append(prefix + [not req[2]])
    return batch


def accuracy_aware(model: nn.Module, calls: list, config: QuantConfig, backend: str, eval_fn: Callable,
                   max_drop: float, progress: bool):
    """The search of the module docstring. Under an initialised ``torch.distributed`` group (``qcast.distributed``)
    its evaluations are split across the ranks: the float and the all-int8 metric side by side, the sensitivity
    ranking one candidate per rank, and the greedy steps ``world size`` at a time, the next step of the one-process
    search plus the steps it would ask for next (``_speculate``). Only the steps on the one-process path are
    recorded, so every rank returns the same ``AccuracySearch`` (and the same model) as one process."""
    from .api import quantize_calls
    from .distributed.search import digest, split, world
    from .report.sensitivity import SQNR_METRIC, analyze, call_metric, float_outputs, sqnr_metric

    w = world()
    size = 1 if w is None else w.size
    show = progress and (w is None or w.rank == 0)
    steps: list[SearchStep] = []
    local: dict[frozenset, Any] = {}  # the int8 models evaluated by this process
    recorded: dict[frozenset, SearchStep] = {}
    results: dict[frozenset, float] = {}  # every evaluated step's metric (from any rank), recorded or not

    def describe(layers) -> str:
        return f"the int8 model with {len(layers)} layer(s) in float {list(layers)[:6]}"

    def record(layers: tuple[str, ...], metric: float, note: str) -> SearchStep:
        step = SearchStep(tuple(layers), metric, metric >= target, note)
        steps.append(step)
        recorded[frozenset(layers)] = step
        log.info("qcast accuracy-aware: %s", step)
        return step

    first, rest = calls[0], calls[1:]
    final_backend = backend
    if backend == "auto":  # search on the torch backend (no engine compiled per step); the chosen model is lowered once
        backend, config = "torch", config.replace(backend="torch")
    qmodel, observed = quantize_calls(model, first, iter(rest), config, backend, show, len(calls))
    local[frozenset()] = qmodel

    def first_two(i: int) -> tuple[float, float]:
        t = time.perf_counter()
        if i == 0:
            value = call_metric(eval_fn, copy.deepcopy(model).eval(), "eval_fn", "the float model")
        else:
            value = call_metric(eval_fn, qmodel, "eval_fn", describe(()))
        return value, time.perf_counter() - t

    (float_metric, _), (full_metric, full_seconds) = split(2, first_two, what="eval_fn on the float and int8 model")
    target = float_metric - float(max_drop)
    full = record((), full_metric, "all int8")
    ranking: tuple[str, ...] = ()
    ranked_by = "-"
    if not full.meets:
        # rank the layers on the simulation of this calibration
        from .report.sensitivity import Simulation
        n_cand = len(Simulation(observed).candidates)
        estimate = full_seconds * (n_cand + 2)  # one process's time, whatever the world size: the same choice
        if estimate <= RANK_BUDGET_S:
            ranked_by = f"eval_fn (float_one sensitivity, {n_cand + 2} eval_fn calls on the QDQ simulation)"
            report = analyze(observed, eval_fn, mode="float_one", progress=show, batches=len(calls),
                             metric_name="eval_fn", argname="eval_fn")
        else:
            ranked_by = (f"output SQNR on the calibration batches (float_one sensitivity): ranking with eval_fn would "
                         f"take ~{estimate:.0f} s ({n_cand + 2} calls of {full_seconds:.1f} s) > {RANK_BUDGET_S:.0f} s")
            metric = sqnr_metric(calls, float_outputs(model, calls))
            report = analyze(observed, metric, mode="float_one", progress=show, batches=len(calls),
                             metric_name=SQNR_METRIC)
        ranking = report.names
        log.info("qcast accuracy-aware: layers ranked by %s: %s", ranked_by, list(ranking))

        def evaluate(layers: tuple[str, ...]) -> float:
            cfg = config.replace(skip=tuple(config.skip) + tuple(exact(n) for n in layers))
            qm, _ = quantize_calls(model, first, iter(rest), cfg, backend, False, len(calls))
            local[frozenset(layers)] = qm
            return call_metric(eval_fn, qm, "eval_fn", describe(layers))

        outcomes: list[bool] = []
        while (req := _next_step(ranking, outcomes)) is not None:
            layers, note, _ = req
            key = frozenset(layers)
            if key in recorded:  # asked again: its result, not a new step
                outcomes.append(recorded[key].meets)
                continue
            if key not in results:
                known = {k: m >= target for k, m in results.items()}
                batch = _speculate(ranking, outcomes, known, size) if size > 1 else [req]
                values = split(len(batch), lambda i: evaluate(batch[i][0]),
                               what=f"accuracy search step {len(steps)} ({len(batch)} model(s))",
                               signature=digest([b[0] for b in batch]))
                results.update((frozenset(b[0]), v) for b, v in zip(batch, values))
            outcomes.append(record(layers, results[key], note).meets)
    met = [s for s in steps if s.meets]
    if met:
        best = min(met, key=lambda s: (len(s.float_layers), -s.metric))
    else:
        best = max(steps, key=lambda s: (s.metric, -len(s.float_layers)))
    qbest = local.get(frozenset(best.float_layers))
    from .distributed import group
    # lowered to the final backend; or, under a process group, re-quantized by every rank together (calibration is a
    # collective there: a rank that evaluated the chosen model cannot skip it while the others calibrate)
    if final_backend != backend or qbest is None or group.active():
        cfg = config.replace(backend=final_backend, skip=tuple(config.skip) + tuple(exact(n) for n in best.float_layers))
        qbest, _ = quantize_calls(model, first, iter(rest), cfg, final_backend, False, len(calls))
    local.clear()
    search = AccuracySearch(float_metric, float(max_drop), target, ranked_by, tuple(ranking), tuple(steps),
                            best.float_layers, best.metric, best.meets)
    qbest.qcast_meta["accuracy_search"] = search
    log.info("qcast accuracy-aware: %r", search)
    if show:
        print(search.table())
    if not met:
        warnings.warn(
            f"qcast accuracy-aware mode: the target eval_fn >= {target:.6g} (float {float_metric:.6g} - max_drop "
            f"{max_drop:g}) was not met, even with all {len(ranking)} candidate layers in float; returning the best "
            f"model found: metric {best.metric:.6g} with {len(best.float_layers)} layer(s) in float. The rest of the "
            "gap is in ops that are not candidates (e.g. passthrough ops, uncaptured regions) or in eval_fn's noise; "
            "see qmodel.qcast_meta['accuracy_search'].table() and qcast.compare(model, qmodel, inputs).",
            UserWarning, stacklevel=3)
    return qbest
