"""qcast: one call turns a PyTorch model into a fast, accurate INT8 model.

>>> qmodel = qcast.quantize(model, calibration_data)
>>> for row in qcast.explain(qmodel): print(row)
"""
from .api import quantize
from .calibrate import CalibrationSummary, calibrate
from .config import QuantConfig
from .convert import convert
from .errors import (CalibrationError, CaptureError, ConfigError, FormatError, InputError, NotCalibratedError,
                     QcastError, UnsupportedError)
from .prepare import ObservedModel, prepare
from .quantized import OpInfo, QuantizedModel, explain
from .serialize import load, save
from .report import compare

__version__ = "0.1.0"

__all__ = [
    "quantize", "prepare", "calibrate", "convert", "explain", "compare", "save", "load", "QuantConfig", "QuantizedModel", "ObservedModel",
    "OpInfo", "CalibrationSummary", "QcastError", "ConfigError", "CaptureError", "InputError", "CalibrationError",
    "NotCalibratedError", "UnsupportedError", "FormatError", "__version__",
]
