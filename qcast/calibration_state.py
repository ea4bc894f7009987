"""Calibration state: everything calibration has accumulated, of a fixed size, saved and resumed.

``observed.calibration_state()`` returns a ``CalibrationState`` (every observer's min/max/histogram/EMA, bias
correction's per-channel input sums, AdaRound's sampled rows, the batch count); ``state.save(path)`` writes it (one
safetensors file, JSON metadata, no pickle); ``qcast.calibrate(observed, rest_of_data, resume=path)`` loads it into a
freshly prepared model and carries on, so calibrating the first half, saving, and the second half in a new process
gives the qparams of one uninterrupted run (tests/test_calibration_state.py). ``calibrate(..., checkpoint=path)``
writes the state when it ends (and every ``checkpoint_every`` batches in a single process); under a process group the
state written (by rank 0) is the reduced one of the whole job (``qcast.distributed``).

Its size does not depend on the number of batches: a histogram is ``bins`` float64 whatever was seen, a channel mean
one float64 per channel, AdaRound's sample at most ``cap`` rows (docs/scale.md).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from .errors import CalibrationError, FormatError

FORMAT = "qcast-calibration-state"
VERSION = 1


@dataclass(frozen=True)
class CalibrationState:
    """What calibration has accumulated. ``entries``: ``(kind, key) -> (values, tensors)`` with ``kind`` in
    ``observer`` (the observer's module name in the graph), ``input_mean`` and ``adaround_rows`` (the layer's module
    path); ``fingerprint``: the observed model's observers and config, checked on resume."""

    batches: int
    fingerprint: str
    entries: dict = field(repr=False, compare=False)

    def __repr__(self) -> str:
        kinds = {}
        for kind, _ in self.entries:
            kinds[kind] = kinds.get(kind, 0) + 1
        return (f"CalibrationState(batches={self.batches}, {', '.join(f'{k}={v}' for k, v in sorted(kinds.items()))}, "
                f"{self.nbytes / 1024:.1f} KiB)")

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held (constant in the number of batches calibrated)."""
        return sum(t.numel() * t.element_size() for _, ts in self.entries.values() for t in ts.values())

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (safetensors; written to a temporary file and renamed, so never half a file)."""
        from safetensors.torch import save_file

        tensors, meta = {}, []
        for i, ((kind, key), (values, ts)) in enumerate(self.entries.items()):
            meta.append({"kind": kind, "key": key, "values": values, "tensors": sorted(ts)})
            for name, t in ts.items():
                tensors[f"{i}/{name}"] = t.detach().contiguous().cpu()
        header = {"format": FORMAT, "version": VERSION, "batches": self.batches, "fingerprint": self.fingerprint,
                  "entries": meta}
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata={"qcast": json.dumps(header)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationState":
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        if not os.path.exists(path):
            raise FormatError(f"{path}: no such calibration state file (written by qcast.calibrate(..., checkpoint=) "
                              "or CalibrationState.save)")
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("qcast", "null"))
                if not isinstance(header, dict) or header.get("format") != FORMAT:
                    raise FormatError(f"{path}: not a qcast calibration state (a qmodel file is read by qcast.load)")
                if header.get("version", 0) > VERSION:
                    raise FormatError(f"{path}: calibration state version {header['version']} is newer than this "
                                      f"qcast reads ({VERSION}); upgrade qcast")
                entries = {}
                for i, e in enumerate(header["entries"]):
                    entries[(e["kind"], e["key"])] = (e["values"], {n: f.get_tensor(f"{i}/{n}") for n in e["tensors"]})
        except (SafetensorError, json.JSONDecodeError, KeyError, OSError) as e:
            raise FormatError(f"{path}: unreadable calibration state ({type(e).__name__}: {e}); write it again") from e
        return cls(int(header["batches"]), header["fingerprint"], entries)


def fingerprint(observed) -> str:
    """Observers (name, estimator, histogram size) and the config: a state resumes only into the same plan."""
    obs = [(n, o.estimator, getattr(o, "bins", 0)) for n, o in observed.observers()]
    text = json.dumps({"observers": obs, "config": observed.qcast_config.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def capture_state(observed) -> CalibrationState:
    entries = {}
    for name, o in observed.observers():
        if o.estimator != "fixed":
            entries[("observer", name)] = o.state()
    for target, st in observed.qcast_input_stats.items():
        entries[("input_mean", target)] = st.state()
    for target, rows in observed.__dict__.get("qcast_layer_inputs", {}).items():
        entries[("adaround_rows", target)] = rows.state()
    batches = observed.qcast_summary.batches if observed.qcast_summary else 0
    return CalibrationState(batches, fingerprint(observed), entries)


def restore_state(observed, state: CalibrationState) -> None:
    """Load ``state`` into ``observed`` (prepared the same way: same model, config and example input shape)."""
    from .adaround import InputRows
    from .calibrate import CalibrationSummary
    from .convert import int8_layers
    from .observers import ChannelMean

    if state.fingerprint != fingerprint(observed):
        raise CalibrationError(
            "the calibration state was saved from a differently prepared model (other observers or config): prepare "
            "the same model with the same QuantConfig and example input as the run that saved it, then resume")
    if any(st.count for st in observed.qcast_input_stats.values()) or any(
            o.batches for _, o in observed.observers() if o.estimator != "fixed"):
        raise CalibrationError("resume= needs a freshly prepared model: this one has already seen calibration data")
    modules = dict(observed.gm.named_children())
    layers = int8_layers(observed.gm)
    for (kind, key), (values, tensors) in state.entries.items():
        if kind == "observer":
            modules[key].load_state(values, tensors)
        elif kind == "input_mean":
            observed.qcast_input_stats.setdefault(key, ChannelMean(int(values["channel_dim"]))).load_state(values, tensors)
        elif kind == "adaround_rows":
            store = observed.__dict__.setdefault("qcast_layer_inputs", {})
            store.setdefault(key, InputRows(layers[key], seed=len(store))).load_state(values, tensors)
    observed.qcast_summary = CalibrationSummary(batches=state.batches, ranges=())
