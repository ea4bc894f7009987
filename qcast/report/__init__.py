"""Reports on a quantized model: per-layer comparison against float, per-layer sensitivity."""
from .compare import CompareReport, LayerReport, compare, sqnr
from .sensitivity import SensitivityReport, SensitivityRow, clear_cache as clear_sensitivity_cache, sensitivity

__all__ = ["compare", "CompareReport", "LayerReport", "sqnr", "sensitivity", "SensitivityReport", "SensitivityRow",
           "clear_sensitivity_cache"]
