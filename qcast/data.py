"""Calibration items -> model calls. Tensor -> model(t); tuple/list -> model(*item); Mapping -> model(**item)."""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import torch

from .errors import WHERE_IT_RUNS, CalibrationError, InputError


def as_call(item: Any, what: str = "input") -> tuple[tuple, dict]:
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, Mapping) or (hasattr(item, "keys") and hasattr(item, "__getitem__") and not isinstance(item, (str, bytes))):
        return (), {str(k): item[k] for k in item.keys()}
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise InputError(f"{what} of type {type(item).__name__} is not a model call: pass a Tensor, a tuple of "
                     "arguments or a dict of keyword arguments (use input_fn=... to extract them from a batch)")


def tensors_in(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield "", obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            for p, t in tensors_in(v):
                yield f"[{k!r}]{p}", t
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            for p, t in tensors_in(v):
                yield f"[{i}]{p}", t


def check_finite(args: tuple, kwargs: dict, where: str) -> None:
    for path, t in tensors_in((args, kwargs)):
        if t.is_floating_point() and not t.numel():
            raise CalibrationError(f"{where}: input{path} has no values (shape {tuple(t.shape)}): calibration needs "
                                   "data to measure ranges on (drop empty batches)")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CalibrationError(f"{where}: input{path} contains {bad} NaN/Inf value(s); calibration needs finite "
                                   "data (clean or drop this batch)")
        if t.device.type != "cpu":
            raise InputError(f"{where}: input{path} is on {t.device}. {WHERE_IT_RUNS}")


def iter_calls(data: Any, input_fn: Callable | None = None, num_batches: int | None = None) -> Iterator[tuple[tuple, dict]]:
    """Calls (args, kwargs) from calibration data; a single Tensor/dict is one item, not iterated."""
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise CalibrationError(f"num_batches must be a positive int, got {num_batches!r}")
    if data is None:
        raise CalibrationError("calibration_data is None: pass a Tensor, a list of inputs or a DataLoader")
    if isinstance(data, (torch.Tensor, Mapping)):
        items: Iterable = [data]
    elif isinstance(data, Iterable):
        items = data
    else:
        raise CalibrationError(f"calibration_data of type {type(data).__name__} is not iterable: pass a Tensor, a "
                               "list of inputs or a DataLoader")
    it = iter(items)
    if num_batches is not None:
        it = itertools.islice(it, num_batches)
    for i, item in enumerate(it):
        if input_fn is not None:
            try:
                item = input_fn(item)
            except Exception as e:  # noqa: BLE001 - the user's function: say which item and what it raised
                raise CalibrationError(f"input_fn raised {type(e).__name__}: {e} on calibration item {i}; input_fn "
                                       "maps one item of calibration_data (e.g. an (inputs, labels) batch) to the "
                                       "model's inputs, e.g. input_fn=lambda batch: batch[0]") from e
        yield as_call(item, "calibration item")


def describe(args: tuple, kwargs: dict) -> str:
    parts = [_desc(a) for a in args] + [f"{k}={_desc(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _desc(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"Tensor{list(v.shape)}:{str(v.dtype).replace('torch.', '')}"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_desc(x) for x in v) + "]"
    return type(v).__name__


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
