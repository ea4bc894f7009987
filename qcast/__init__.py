"""qcast: one call turns a PyTorch model into a fast, accurate INT8 model.

>>> qmodel = qcast.quantize(model, calibration_data)
>>> for row in qcast.explain(qmodel): print(row)
"""
import warnings as _warnings

from .accuracy import AccuracySearch, SearchStep
from .api import quantize
from .calibrate import CalibrationSummary, calibrate
from .config import QuantConfig
from .convert import convert
from .export import export
from .errors import (CalibrationError, CaptureError, ConfigError, DistributedError, EvalError, FormatError, InputError, NotCalibratedError,
                     QcastError, UnsupportedError)
from .prepare import ObservedModel, prepare
from .qat import QATModel, prepare_qat, simulate
from .quantized import OpInfo, QuantizedModel, explain
from .quantizers import FakeQuantizer, Grid, register_quantizer
from .schemes import SCHEMES, Scheme
from .serialize import load, save
from .report import SensitivityReport, compare, sensitivity

#: PyTorch 2.13 deprecates creating quantized tensors (pytorch/pytorch#184982), which the torch backend does by design
#: (docs/design.md, known limits). The notice is silenced where qcast's own code triggers it (torch warns once per
#: process, attributed to the calling line), not for the user's own calls.
_TORCH_QTENSOR_NOTICE = "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation"
_warnings.filterwarnings("ignore", message=_TORCH_QTENSOR_NOTICE, category=UserWarning, module=r"qcast(\.|$)")

__version__ = "0.1.0"

__all__ = [
    "quantize", "prepare", "calibrate", "convert", "explain", "compare", "sensitivity", "save", "load", "export", "QuantConfig", "QuantizedModel", "ObservedModel",
    "OpInfo", "CalibrationSummary", "QcastError", "ConfigError", "CaptureError", "InputError", "CalibrationError",
    "NotCalibratedError", "UnsupportedError", "EvalError", "FormatError", "DistributedError", "SensitivityReport", "AccuracySearch",
    "SearchStep", "FakeQuantizer", "Grid", "register_quantizer", "Scheme", "SCHEMES", "prepare_qat", "QATModel", "simulate", "__version__",
]
