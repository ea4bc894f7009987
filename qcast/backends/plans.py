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
and is kept. A model whose per-token plan is itself under 30 dB from float (the real MiniLM: 27.6 dB on real tokens)
cannot be held to it: there a plan is faithful when it is within ``MIXED_MARGIN`` dB of the per-token plan (the floor is
``min(STATIC_MIN_SQNR, per-token - MIXED_MARGIN)``). MiniLM's static plan (18.6 dB, embedding cosine 0.993) is rejected.
Cosine is recorded too; SQNR decides, since it also catches a scale error cosine is blind to.

The mixed plan (``"mixed"``), built only where the static one misses the floor: static per-tensor inputs on every
linear but the few that cost most, which stay per-token (``mixed_linears``: the accuracy-aware machinery's switchable
simulation of the static plan, ``qcast.report.sensitivity.Simulation``, ranks the per-token-able linears by how much
keeping each one unquantized gains, then takes them most sensitive first until the simulation is within
``MIXED_MARGIN`` dB of all of them unquantized, or ``MIXED_SAFETY`` dB above the floor). On the real all-MiniLM-L6-v2 the FFN output linears rank first (their
input is the GELU output, with outlier channels SmoothQuant cannot flatten), then many linears of 0.02-0.3 dB each:
docs/design.md, "auto's mixed plan".
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

#: the static plan's worst output must be at least this close to the float model's (dB, held-back calibration batch)
STATIC_MIN_SQNR = 30.0
#: ... or, where the per-token plan itself is under ``STATIC_MIN_SQNR``, within this many dB of the per-token plan's.
#: An embedding's cosine loss scales with the noise power: MiniLM per-token 27.6 dB / cosine 0.9991, static 18.6 dB /
#: 0.9939 (x6.8 the loss for 9 dB), so 3 dB below per-token is about 0.998, inside the issue's 0.997 target.
MIXED_MARGIN = 3.0
#: the mixed plan's ranking stops this many dB above the held-back floor at the latest (``mixed_linears``): the
#: simulation keeps the chosen linears float, the engines quantize them per token, which costs a little
MIXED_SAFETY = 1.0
#: simulated calibration batches the mixed plan's linear ranking runs on (each ranking step runs them all)
MIXED_BATCHES = 2


@dataclass(frozen=True)
class PlanVariant:
    """One plan ``auto`` built: ``"per-token"`` (the default config's) or ``"static"`` (``activation="int8"``), the
    backend it chose, its fastest call (ms, timed interleaved with the other plan), its worst-output SQNR (dB) and
    lowest cosine against the float model on the held-back batch, and why it was not kept (``""``: eligible)."""

    plan: str  # "per-token", "static" or "mixed"
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


def floor(per_token_sqnr: float | None) -> float:
    """The SQNR vs float (dB) a static or mixed plan needs on the held-back batch: ``STATIC_MIN_SQNR``, or
    ``MIXED_MARGIN`` under the per-token plan's own where that is lower (module docstring)."""
    if per_token_sqnr is None or not math.isfinite(per_token_sqnr):
        return STATIC_MIN_SQNR
    return min(STATIC_MIN_SQNR, per_token_sqnr - MIXED_MARGIN)


def static_config(config, per_token=()):
    """The static plan's config: ``activation="int8"``, with the linears named in ``per_token`` (explain() names)
    left at ``"auto"`` (per-token on token sequences): the mixed plan."""
    from ..accuracy import exact

    config = config.replace(activation="int8")
    if not per_token:
        return config
    return config.replace(per_layer={**{k: dict(v) for k, v in config.per_layer.items()},
                                     **{exact(name): {"activation": "auto"} for name in per_token}})


def per_token_names(qdq) -> set[str]:
    """explain() names of the per-token dynamic linears of a QDQ graph (the ones a mixed plan may keep per-token)."""
    from .context import Ctx

    return {p.name for n in qdq.graph.nodes if (p := Ctx.plan(n)) is not None and p.kernel is not None
            and p.kernel.op == "linear:dynamic"}


def mixed_linears(model: nn.Module, observed, calls: list[tuple[tuple, dict]], eligible: set[str],
                  need: float = float("inf")) -> tuple[list, dict]:
    """The linears of the calibrated static plan ``observed`` to keep per-token, most sensitive first, and a record.

    On the static plan's switchable QDQ simulation (``qcast.report.sensitivity.Simulation``) over ``calls``: each
    ``eligible`` linear's gain in output SQNR vs float when it alone is left unquantized (its weight and the input
    only it reads: what a per-token linear's input is in the simulation); then, most sensitive first, linears are
    added until the simulation is within ``MIXED_MARGIN`` dB of all eligible linears unquantized (the per-token plan's
    simulation) or ``MIXED_SAFETY`` dB above ``need`` (the floor the held-back check will apply), whichever is lower.
    The second bound matters where the per-token kernels lose dB of their own (MiniLM at 16 tokens: all 36 token
    linears unquantized simulate 30.4 dB, the per-token plan measures 27.6): without it the ranking took 13 linears
    where the floor needs fewer."""
    from ..report.sensitivity import Simulation

    metric = token_sqnr_metric(model, calls)
    sim = Simulation(observed)
    names = [name for name, op in sim.candidates if op == "linear" and name in eligible]
    sim.set(floated=set())
    static_db = metric(sim.model)
    sim.set(floated=set(names))
    target = min(metric(sim.model) - MIXED_MARGIN, need + MIXED_SAFETY)
    gains = {}
    for name in names:
        sim.set(floated={name})
        gains[name] = metric(sim.model) - static_db
    order = sorted(names, key=lambda n: -gains[n])
    chosen, db = [], static_db
    for name in order:
        if db >= target:
            break
        chosen.append(name)
        sim.set(floated=set(chosen))
        db = metric(sim.model)
    sim.set(floated=set())
    return chosen, {"static_sim_db": round(static_db, 2), "target_sim_db": round(target, 2),
                    "mixed_sim_db": round(db, 2), "per_token": list(chosen),
                    "gains_db": {n: round(gains[n], 2) for n in order[:max(len(chosen) + 3, 6)]}}


def token_sqnr_metric(float_model: nn.Module, calls: list[tuple[tuple, dict]]) -> Callable[[nn.Module], float]:
    """``fn(model) -> dB``: the worst output's SQNR against ``float_model`` over ``calls`` (signal and noise summed over
    the calls), on real tokens only where a call has an integer ``attention_mask``, as ``fidelity`` compares. Padded
    positions would decide it otherwise: MiniLM's static plan measures 9.9 dB over every position at 16 tokens, and
    every linear then looks worth keeping per-token."""
    from .structure import flatten

    with torch.no_grad():
        refs = [flatten(float_model(*args, **kwargs))[0] for args, kwargs in calls]

    def metric(model: nn.Module) -> float:
        sums: dict[int, list[float]] = {}
        with torch.no_grad():
            for (args, kwargs), ref in zip(calls, refs):
                outs, _ = flatten(model(*args, **kwargs))
                mask = _token_mask(args, kwargs)
                for i, (a, b) in enumerate(zip(ref, outs)):
                    if not a.is_floating_point():
                        continue
                    if mask is not None and a.dim() >= 2 and a.shape[:2] == mask.shape:
                        a, b = a[mask], b[mask]
                    acc = sums.setdefault(i, [0.0, 0.0])
                    acc[0] += float(a.double().pow(2).sum())
                    acc[1] += float((a.double() - b.double()).pow(2).sum())
        return min((10 * math.log10(sig / noise) if noise > 0 else float("inf")) for sig, noise in sums.values()) \
            if sums else float("inf")
    return metric


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
    """The kept QuantizedModel: ``per_token`` (built on every call), the static plan, or the mixed plan.
    ``build_static(iterator, per_token_names=())`` builds ``(qmodel, observed)`` of the static plan (with those
    linears per-token: the mixed plan) on all calls but the last, which every plan is measured on. ``calls``: a list of
    ``(args, kwargs)`` or a function returning a fresh iterator over them (each build is a pass over re-iterable data:
    nothing is held in memory but the held-back batch and the ``MIXED_BATCHES`` the mixed plan's ranking runs on).
    The decision goes into the kept model's ``qcast_meta["backend_choice"]["plans"]`` (with ``"kept"`` and
    ``"extra_s"``, the time the other variants cost)."""
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
    ranking: list = []  # the first MIXED_BATCHES calls of the first pass: what the mixed plan's ranking runs on
    observed = None

    def first_pass():
        for call in itertools.chain([first], rest):
            if len(ranking) < MIXED_BATCHES:
                ranking.append(call)
            yield call

    def another_pass():
        if not callable(calls):
            return iter(list(calls)[:-1])
        again = calls()
        return _AllButLast(again, next(again))

    def build(name: str, iterator, *linears: str):
        nonlocal observed
        try:
            with warnings.catch_warnings():  # the plan's own warnings (e.g. auto keeping torch): its fidelity judges
                warnings.simplefilter("ignore")
                variants[name], observed = build_static(iterator, linears)
        except Exception as e:  # noqa: BLE001 - a plan that cannot be built is a rejected candidate, not a failure
            rejected[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    build("static", first_pass())
    held = [rest.held()]
    scores = {name: fidelity(float_model, q, held) for name, q in variants.items()}
    need = floor(scores["per-token"][0])
    mixed_record = None
    if "static" in scores and scores["static"][0] < need and observed is not None:
        try:
            linears, mixed_record = mixed_linears(float_model, observed, ranking,
                                                  per_token_names(per_token.qcast_qdq), need)
        except Exception as e:  # noqa: BLE001 - no ranking: no mixed plan, said why
            linears, mixed_record = [], {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        observed = None  # the static plan's calibrated graph: not needed any more
        if linears:
            build("mixed", another_pass(), *linears)
            if "mixed" in variants:
                scores["mixed"] = fidelity(float_model, variants["mixed"], held)
        else:
            rejected["mixed"] = "not built: " + mixed_record.get("error", "no linear to keep per-token")
    observed = None
    times, _ = timer(dict(variants), *held[0])
    rows = []
    for name in ("per-token", "static", "mixed"):
        if name == "mixed" and mixed_record is None:
            continue
        q = variants.get(name)
        db, cos = scores.get(name, (None, None))
        why = rejected.get(name, "")
        if name != "per-token" and not why and db < need:
            why = f"output SQNR vs float {db:.1f} dB < {need:.1f} dB (cosine {cos:.4f})"
        rows.append(PlanVariant(name, q.qcast_meta["backend"] if q is not None else None, times.get(name), db, cos, why))
    eligible = [r for r in rows if not r.rejected]
    best = min(eligible, key=lambda r: r.ms)
    for i, r in enumerate(rows):
        if r.plan != best.plan and not r.rejected:
            rows[i] = PlanVariant(**{**r.__dict__, "rejected": f"slower than {best.plan}: {r.ms:.2f} ms vs "
                                                               f"{best.ms:.2f} ms"})
    kept = variants[best.plan]
    plans = {"kept": best.plan, "min_sqnr_vs_float": round(need, 2), "held_back_batches": len(held),
             "variants": [r.to_dict() for r in rows], "extra_s": round(time.perf_counter() - t0, 3)}
    if mixed_record is not None:
        plans["mixed"] = mixed_record
    if kept is not per_token:  # the kept model's own backend candidates stay; the per-token ones are kept alongside
        kept.qcast_meta.setdefault("backend_choice", {})["per_token_candidates"] = choice.get("candidates")
    kept.qcast_meta.setdefault("backend_choice", {})["plans"] = plans
    return kept
