"""``backend="auto"`` on transformers: also try a static-linear plan, keep it where it is faithful to float and faster.

With the default config (``activation="auto"``) linears on token sequences are per-token dynamic: OpenVINO runs them
int8 by its own run-time quantization, ONNX Runtime in float. The same model with static per-tensor linear inputs
(``activation="int8"``) runs much faster on OpenVINO (DeiT-tiny batch 1: 24 vs 69 ms, docs/design.md) but is not
always faithful: on the real all-MiniLM-L6-v2 static int8 drops the sentence embedding's cosine to 0.96 (per-token:
0.999). So ``quantize(..., backend="auto")`` builds both plans on the same calibration data and keeps the static one
only where, on a calibration batch it was not calibrated on, its worst output's SQNR against the *float model* is at
least ``STATIC_MIN_SQNR`` and it is the faster of the two (timed interleaved). Every variant, its fidelity, time and
why it was rejected is in ``qcast_meta["backend_choice"]["plans"]``.

``STATIC_MIN_SQNR = 30`` dB: the issue's DeiT target (>= 30 dB vs float); DeiT-tiny's static plan measures 31.5-31.8 dB
and is kept, MiniLM's static embedding (cosine 0.96) measures far below (an output at cosine c to float has an SQNR of at
most -10 log10(1 - c^2) dB: 11 dB at 0.96) and is rejected. Cosine is recorded too; SQNR decides, since it also
catches a scale error cosine is blind to.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

#: the static plan's worst output must be at least this close to the float model's (dB, held-back calibration batch)
STATIC_MIN_SQNR = 30.0


@dataclass(frozen=True)
class PlanVariant:
    """One plan ``auto`` built: ``"per-token"`` (the default config's) or ``"static"`` (``activation="int8"``), the
    backend it chose, its fastest call (ms, timed interleaved with the other plan), its worst-output SQNR (dB) and
    lowest cosine against the float model on the held-back batch, and why it was not kept (``""``: eligible)."""

    plan: str
    backend: str | None
    ms: float | None
    sqnr_vs_float: float | None
    cosine_vs_float: float | None
    rejected: str = ""

    def to_dict(self) -> dict:
        return {"plan": self.plan, "backend": self.backend, "ms": self.ms, "sqnr_vs_float": self.sqnr_vs_float,
                "cosine_vs_float": self.cosine_vs_float, "rejected": self.rejected}


def skip_reason(config, backend: str) -> str:
    """Why no static variant is built for this request (cheap: no model run), or ``""`` when it is worth building.
    When it is, ``quantize`` makes a second pass over re-iterable data (a list, a DataLoader: ``iter(data)`` is not
    ``data``) to calibrate the second plan, and keeps the batches in memory (a list) only for a one-shot iterator (a
    generator), which cannot be read twice."""
    if backend != "auto":
        return f"backend={backend!r}, not 'auto'"
    if config.activation != "auto" or any("activation" in over for over in config.per_layer.values()):
        return "the config sets activation: the user's plan is kept"
    from . import kernel_table
    from .auto import candidates
    if not [b for b in candidates(kernel_table(config.backend)) if b.name != "torch"]:
        return "no engine backend (openvino, onnxruntime) installed"
    return ""


def fidelity(float_model: nn.Module, qmodel: nn.Module, calls: list[tuple[tuple, dict]]) -> tuple[float, float]:
    """``(worst-output SQNR dB, lowest cosine)`` of ``qmodel`` against ``float_model`` over ``calls``. A call with an
    integer ``attention_mask`` (batch, tokens) compares its (batch, tokens, ...) outputs on the unmasked tokens only:
    a padded token's hidden state is never read (MiniLM's mean pooling masks it) and differs freely between plans."""
    from ..report import sqnr
    from .structure import flatten
    worst, cos = float("inf"), 1.0
    with torch.no_grad():
        for args, kwargs in calls:
            (refs, _), (outs, _) = flatten(float_model(*args, **kwargs)), flatten(qmodel(*args, **kwargs))
            if len(refs) != len(outs) or any(a.shape != b.shape for a, b in zip(refs, outs)):
                return float("-inf"), -1.0
            mask = _token_mask(args, kwargs)
            for a, b in zip(refs, outs):
                if a.is_floating_point():
                    if mask is not None and a.dim() >= 2 and a.shape[:2] == mask.shape:
                        a, b = a[mask], b[mask]  # padded tokens' outputs carry no meaning: compare real tokens only
                    worst = min(worst, sqnr(a.float(), b.float()))
                    cos = min(cos, float(torch.nn.functional.cosine_similarity(
                        a.double().flatten(), b.double().flatten(), dim=0)))
    return worst, cos


def _token_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``attention_mask`` keyword of a Hugging Face-style call as a bool (batch, tokens) tensor, or None."""
    m = kwargs.get("attention_mask")
    if isinstance(m, torch.Tensor) and m.dim() == 2 and not m.is_floating_point() and bool(m.any()):
        return m != 0
    return None


class _AllButLast:
    """Iterates every call of ``it`` but the last, which ``held()`` returns: the static plan calibrates on a second
    pass over the data while holding one batch, not the data set."""

    _END = object()

    def __init__(self, it, first):
        self.it, self.prev, self.last = it, first, None

    def __iter__(self):
        return self

    def __next__(self):
        nxt = next(self.it, self._END)
        if nxt is self._END:
            self.last = self.prev
            raise StopIteration
        out, self.prev = self.prev, nxt
        return out

    def held(self):
        for _ in self:  # a static build that failed half-way: the rest of the pass, to reach the last call
            pass
        return self.last


def choose_plan(model: nn.Module, calls, per_token, build_static: Callable, timer=None):
    """The kept QuantizedModel: ``per_token`` (built on every call) or the static plan ``build_static(iterator)``
    builds on all calls but the last, which both are measured on. ``calls``: a list of ``(args, kwargs)`` or a
    function returning a fresh iterator over them (a second pass over re-iterable data: nothing is held in memory but
    one batch). The decision goes into the kept model's ``qcast_meta["backend_choice"]["plans"]`` (with ``"kept"``
    and ``"extra_s"``, the time the static variant cost)."""
    from ..timing import time_interleaved
    from .context import dynamic_linears

    timer = timer or time_interleaved
    choice = per_token.qcast_meta.setdefault("backend_choice", {})
    if per_token.qcast_qdq is None or not dynamic_linears(per_token.qcast_qdq):
        choice["plans"] = {"kept": "per-token", "skipped": "no per-token dynamic linears in the plan"}
        return per_token
    stream = calls() if callable(calls) else iter(calls)
    first, second = next(stream, None), next(stream, None)
    if second is None:
        choice["plans"] = {"kept": "per-token", "skipped": "one calibration batch: none to hold back for measuring the "
                                                          "static plan's fidelity; pass two or more"}
        return per_token
    t0 = time.perf_counter()
    float_model = copy.deepcopy(model).eval() if model.training else model
    import itertools
    rest = _AllButLast(stream, second)
    variants = {"per-token": per_token}
    rejected = {}
    try:
        with warnings.catch_warnings():  # the static plan's own warnings (e.g. auto keeping torch): its fidelity judges
            warnings.simplefilter("ignore")
            variants["static"] = build_static(itertools.chain([first], rest))
    except Exception as e:  # noqa: BLE001 - a static plan that cannot be built is a rejected candidate, not a failure
        rejected["static"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    held = [rest.held()]
    scores = {name: fidelity(float_model, q, held) for name, q in variants.items()}
    times, _ = timer(variants, *held[0])
    rows = []
    for name in ("per-token", "static"):
        q = variants.get(name)
        db, cos = scores.get(name, (None, None))
        why = rejected.get(name, "")
        if name == "static" and not why and db < STATIC_MIN_SQNR:
            why = f"output SQNR vs float {db:.1f} dB < {STATIC_MIN_SQNR} dB (cosine {cos:.4f})"
        rows.append(PlanVariant(name, q.qcast_meta["backend"] if q is not None else None, times.get(name), db, cos, why))
    eligible = [r for r in rows if not r.rejected]
    best = min(eligible, key=lambda r: r.ms)
    if best.plan != "static" and not rows[1].rejected:
        rows[1] = PlanVariant(**{**rows[1].__dict__, "rejected": f"slower than per-token: {rows[1].ms:.2f} ms vs "
                                                                f"{rows[0].ms:.2f} ms"})
    kept = variants[best.plan]
    plans = {"kept": best.plan, "min_sqnr_vs_float": STATIC_MIN_SQNR, "held_back_batches": len(held),
             "variants": [r.to_dict() for r in rows], "extra_s": round(time.perf_counter() - t0, 3)}
    if kept is not per_token:  # the static model's own backend candidates stay; the per-token ones are kept alongside
        kept.qcast_meta.setdefault("backend_choice", {})["per_token_candidates"] = choice.get("candidates")
    kept.qcast_meta.setdefault("backend_choice", {})["plans"] = plans
    return kept
