"""Every error qcast raises, in one tree.

::

    QcastError                      base of everything below; catch this to catch all of qcast
    ├── ConfigError                 a QuantConfig key, value or glob is wrong (names the key)
    ├── CaptureError                the model could not be captured at all (names the module)
    ├── InputError                  an input does not fit the model: rank, channels, dtype (names the layer)
    ├── CalibrationError            calibration data is empty, NaN/Inf, or not callable on the model
    │   └── NotCalibratedError      convert() found an observer that saw no data (names the layer)
    ├── UnsupportedError            something qcast cannot do here yet (CUDA model, unknown backend)
    ├── EvalError                   the user's eval_fn / metric raised or returned something that is not a number
    ├── FormatError                 a saved file is truncated, tampered, of a newer version, or needs `model=`
    └── DistributedError            a rank of a torch.distributed job died or timed out (names the rank)

Messages always name the layer (module path) or argument concerned, and say what to do about it.
"""
from __future__ import annotations


#: what runs where, said the same way by every error about a device (docs/design.md, "What runs where")
WHERE_IT_RUNS = ("qcast's int8 models run on the CPU: PyTorch's int8 kernels are CPU-only (x86: onednn/x86/fbgemm; "
                 "ARM: qnnpack, QuantConfig(engine='qnnpack')). Quantize a CPU copy of the model and run it on CPU "
                 "tensors; training on CUDA comes with quantization-aware training (on the roadmap)")


class QcastError(Exception):
    """Base class of every error raised by qcast."""


class ConfigError(QcastError, ValueError):
    """A configuration key or value is invalid."""


class CaptureError(QcastError):
    """The model (or its root forward) could not be captured into a graph."""


class InputError(QcastError, ValueError):
    """An input does not fit the model (wrong rank, channels, dtype, device)."""


class CalibrationError(QcastError, ValueError):
    """Calibration data is unusable: empty, NaN/Inf, or does not fit the model."""


class NotCalibratedError(CalibrationError):
    """convert() was called on observers that have seen no data."""


class UnsupportedError(QcastError):
    """A request qcast cannot serve in this configuration (e.g. a CUDA model on the CPU backend)."""


class EvalError(QcastError):
    """The user's ``eval_fn`` / ``metric`` raised, or returned something that is not a number."""


class FormatError(QcastError):
    """A saved qcast file is unreadable: truncated, tampered, newer version, or missing its float model."""


class DistributedError(QcastError, RuntimeError):
    """A rank of a ``torch.distributed`` job failed, died, timed out, or sent something that cannot be used, during a
    collective qcast phase (calibration, a reduction, a decision made on rank 0, a sensitivity or search exchange): the
    message names the rank(s) and their errors (``qcast.distributed``)."""


__all__ = [
    "WHERE_IT_RUNS", "QcastError", "ConfigError", "CaptureError", "InputError", "CalibrationError",
    "NotCalibratedError", "UnsupportedError", "EvalError", "FormatError", "DistributedError",
]
