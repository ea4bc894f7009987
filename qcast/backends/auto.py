"""``backend="auto"``: lower the QDQ graph to every installed backend, check each against the QDQ simulation on a
calibration input, time them interleaved on that input, keep the fastest.

A backend is rejected (and says why in ``qcast_meta["backend_choice"]``) when it cannot lower the graph (an
``UnsupportedError``: e.g. a model calling a region of Python qcast could not capture, on OpenVINO), raises when
run, or disagrees with the simulation by more than ``MIN_SQNR`` dB. Backends round differently from the float simulation: one 8-bit step flipped costs a
random-weight CNN's output ~36-40 dB (docs/design.md, OpenVINO backend), and the zoo's UNet, whose float region
branches on its input's mean, measured 29.7 dB on the torch backend; a wrong lowering costs far more (< 10 dB).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import QcastError, UnsupportedError
from ..timing import time_interleaved
from . import Backend, backend_names, get_backend

#: a backend's output must agree with the QDQ simulation's to at least this SQNR (dB, worst output tensor)
MIN_SQNR = 20.0
#: a candidate whose fastest call is over this many times the leader's after the first rounds is timed no more
#: (ResNet-18 under auto: ONNX Runtime, running its residual convs in float, 4-5x OpenVINO's time; measured calls of
#: one backend within a round vary by far less than 2x on a quiet machine)
DROP_ABOVE = 2.0


@dataclass(frozen=True)
class Candidate:
    """One backend tried by ``auto``: its fastest call (ms), its agreement with the QDQ simulation (dB), and why it was
    not kept (``""``: it was eligible)."""

    backend: str
    ms: float | None
    sqnr_vs_sim: float | None
    rejected: str = ""

    def to_dict(self) -> dict:
        return {"backend": self.backend, "ms": self.ms, "sqnr_vs_sim": self.sqnr_vs_sim, "rejected": self.rejected}

    def __repr__(self) -> str:
        if self.rejected:
            return f"Candidate({self.backend}, rejected: {self.rejected})"
        return f"Candidate({self.backend}, {self.ms:.3f} ms, {self.sqnr_vs_sim:.1f} dB vs simulation)"


def candidates(kernels: str) -> list[Backend]:
    """The installed backends that execute the plan of ``kernels`` (the kernel table the model was planned with)."""
    out = []
    for name in backend_names():
        backend = get_backend_or_none(name)
        if backend is not None and backend.kernels == kernels:
            out.append(backend)
    return out


def get_backend_or_none(name: str) -> Backend | None:
    try:
        return get_backend(name)
    except UnsupportedError:  # not installed
        return None


def _agreement(ref, out) -> float:
    from ..report import sqnr
    from .structure import flatten
    (refs, _), (outs, _) = flatten(ref), flatten(out)
    if len(refs) != len(outs) or any(a.shape != b.shape for a, b in zip(refs, outs)):
        return float("-inf")
    return min((sqnr(a.float(), b.float()) for a, b in zip(refs, outs) if a.is_floating_point()), default=float("inf"))


#: a graph with per-token dynamic linears: the simulation keeps them float, while every executor quantizes them (the
#: torch backend per token, OpenVINO per token and group of 32 channels, ONNX Runtime's int8 weights), so none agrees
#: with it to ``MIN_SQNR`` on a model whose output has outlier channels. Measured on the real all-MiniLM-L6-v2 (4 x 32
#: tokens, last_hidden_state): torch 16.5 dB, OpenVINO 19.3, ONNX Runtime 17.6 from the simulation, all at embedding
#: cosine >= 0.9985 to float. There an engine must agree with the simulation at least as well as PyTorch's own
#: per-token kernels do, less this margin (dB); a wrong lowering (a frozen size, a lost mask) costs far more.
DYNAMIC_MARGIN = 3.0


def agreement_floor(qdq: nn.Module, torch_agreement: float | None) -> float:
    """The agreement with the simulation a backend needs (dB): ``MIN_SQNR``, or, for a graph with per-token dynamic
    linears, the torch backend's own agreement less ``DYNAMIC_MARGIN`` where that is lower."""
    from .context import dynamic_linears

    if torch_agreement is None or not dynamic_linears(qdq):
        return MIN_SQNR
    return min(MIN_SQNR, torch_agreement - DYNAMIC_MARGIN)


def choose(qdq: nn.Module, lower, kernels: str, example: tuple[tuple, dict]) -> tuple[str, nn.Module, list[Candidate]]:
    """``(name, lowered module, every candidate)``; ``lower(backend) -> nn.Module`` lowers the QDQ graph for one."""
    args, kwargs = example
    with torch.no_grad():
        ref = qdq(*args, **kwargs)
    lowered: dict[str, nn.Module] = {}
    tried: dict[str, Candidate] = {}
    fallback = None  # the torch backend's module when it ran but disagreed: kept if every backend disagrees
    ran: dict[str, tuple[nn.Module, float]] = {}
    for backend in candidates(kernels):
        try:
            module = lower(backend)
            with torch.no_grad():
                ran[backend.name] = (module, _agreement(ref, module(*args, **kwargs)))
        except QcastError as e:
            tried[backend.name] = Candidate(backend.name, None, None, f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - an engine's own failure rejects that engine, not the model
            tried[backend.name] = Candidate(backend.name, None, None, f"{type(e).__name__}: {str(e).splitlines()[0]}")
    floor = agreement_floor(qdq, ran.get("torch", (None, None))[1])
    for name, (module, agree) in ran.items():
        if agree < floor:
            tried[name] = Candidate(name, None, agree, f"output differs from the QDQ simulation: {agree:.1f} dB < "
                                    f"{floor:.1f} dB")
            if name == "torch":
                fallback = module
            continue
        lowered[name] = module
        tried[name] = Candidate(name, None, agree)
    if not lowered and fallback is not None:
        # torch is the reference executor: when the check itself is what failed (e.g. on a degenerate example input),
        # keep it rather than fail the whole conversion, and say so
        warnings.warn(f"backend='auto': every backend disagreed with the QDQ simulation on the example input "
                      f"({'; '.join(f'{c.backend}: {c.rejected}' for c in tried.values())}); keeping torch, the "
                      "reference executor. Check the model with qcast.compare(model, qmodel, inputs)", UserWarning,
                      stacklevel=4)
        lowered["torch"] = fallback
    if not lowered:
        raise UnsupportedError("backend='auto': no installed backend could run this model: " + "; ".join(
            f"{c.backend}: {c.rejected}" for c in tried.values()))
    times, _ = time_interleaved(lowered, args, kwargs, drop_above=DROP_ABOVE)
    for name, ms in times.items():
        tried[name] = Candidate(name, ms, tried[name].sqnr_vs_sim)
    best = min(times, key=times.get)
    return best, lowered[best], list(tried.values())
