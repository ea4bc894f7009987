"""Reports on a quantized model: per-layer comparison against float."""
from .compare import CompareReport, LayerReport, compare, sqnr

__all__ = ["compare", "CompareReport", "LayerReport", "sqnr"]
