"""Timing several models on one input, interleaved, within a time budget: the speed check of ``quantize``
(``qcast.report.speed``) and ``backend="auto"`` (``qcast.backends.auto``) measure the same way.

Interleaving (a, b, c, a, b, c, ...) makes a drift of the machine's load hit every candidate alike; the fastest call
of each is the estimate least disturbed by other work.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

#: stop timing once the models have run this long in total (seconds), after at least MIN_REPEATS rounds
BUDGET_S, MIN_REPEATS, MAX_REPEATS = 0.5, 2, 10


def time_interleaved(models: dict[str, nn.Module], args: tuple, kwargs: dict,
                     drop_above: float | None = None) -> tuple[dict[str, float], int]:
    """Fastest call of each model in ms, timed interleaved on one input (one warm-up each: oneDNN and the engines
    build their primitives on the first call, then rounds until ``BUDGET_S`` is spent, ``MIN_REPEATS`` to
    ``MAX_REPEATS`` rounds), and the number of rounds. ``drop_above``: after ``MIN_REPEATS`` rounds, a model whose
    fastest call is over ``drop_above`` times the fastest model's is timed no more (it cannot win; its figure stays
    its fastest call so far), which leaves the budget to the close ones."""
    best = dict.fromkeys(models, float("inf"))
    timed = dict(models)
    spent, repeats = 0.0, 0
    with torch.no_grad():
        for m in models.values():
            m(*args, **kwargs)
        while repeats < MAX_REPEATS and (repeats < MIN_REPEATS or spent < BUDGET_S):
            for key, m in timed.items():
                t = time.perf_counter()
                m(*args, **kwargs)
                dt = time.perf_counter() - t
                best[key], spent = min(best[key], dt), spent + dt
            repeats += 1
            if drop_above is not None and repeats >= MIN_REPEATS:
                lead = min(best.values())
                timed = {k: m for k, m in timed.items() if best[k] <= drop_above * lead}
    return {k: v * 1e3 for k, v in best.items()}, repeats
