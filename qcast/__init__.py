"""qcast: one call turns a PyTorch model into a fast, accurate INT8 model.

>>> qmodel = qcast.quantize(model, calibration_data)
>>> for row in qcast.explain(qmodel): print(row)
"""
from .accuracy import AccuracySearch, SearchStep
from .api import quantize
from .calibrate import CalibrationSummary, calibrate
from .config import QuantConfig
from .convert import convert
from .errors import (CalibrationError, CaptureError, ConfigError, EvalError, FormatError, InputError, NotCalibratedError,
                     QcastError, UnsupportedError)
from .prepare import ObservedModel, prepare
from .quantized import OpInfo, QuantizedModel, explain
from .serialize import load, save
from .report import SensitivityReport, compare, sensitivity

__version__ = "0.1.0"

__all__ = [
    "quantize", "prepare", "calibrate", "convert", "explain", "compare", "sensitivity", "save", "load", "QuantConfig", "QuantizedModel", "ObservedModel",
    "OpInfo", "CalibrationSummary", "QcastError", "ConfigError", "CaptureError", "InputError", "CalibrationError",
    "NotCalibratedError", "UnsupportedError", "EvalError", "FormatError", "SensitivityReport", "AccuracySearch",
    "SearchStep", "__version__",
]
